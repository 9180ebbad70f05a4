"""Live: doctor's table agrees with what the kernel says independently."""
import os

import pytest

from conftest import klp

pytestmark = pytest.mark.live


def rows(text):
    out = {}
    for line in text.splitlines():
        parts = line.split(None, 2) if not line.startswith(("symbol ", "probe ", "fentry",
                                                             "kprobe", "tracepoint", "kernel",
                                                             "fix ")) else None
        if parts is None:
            name, rest = line.split("  ", 1)
            status, _, detail = rest.strip().partition("  ")
            out[name.strip()] = (status.strip(), detail.strip())
        elif len(parts) >= 2:
            out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return out


def test_doctor_matches_kernel_facts(live):
    short = klp("doctor")
    assert short.returncode == 0, short.stderr
    # a screen: a line per check and per probe, no symbol and no internal name
    assert len(short.stdout.splitlines()) <= 40, short.stdout
    assert "kvmlp_" not in short.stdout and "symbol " not in short.stdout
    assert rows(short.stdout)["probe contention"] == ("ok", "raw_tracepoint; on by default")
    p = klp("doctor", "-v")
    assert p.returncode == 0, p.stderr
    assert "kvmlp_" not in p.stdout
    r = rows(p.stdout)
    assert r["tracepoint lock:contention_begin/end"][0] == "ok"
    assert r["probe contention"] == ("ok", "raw_tracepoint")
    has_kprobes = os.path.exists("/sys/bus/event_source/devices/kprobe") or \
        os.path.exists("/sys/kernel/tracing/kprobe_events")
    assert (r["kprobe attach"][0] == "ok") == has_kprobes
    if not has_kprobes:
        assert "CONFIG_KPROBES" in r["kprobe attach"][1]
    assert r["fentry load (trial)"][0] in ("ok", "no")
    if r["fentry load (trial)"][0] == "no":
        assert r["fentry load (trial)"][1]            # says why
    matching = os.path.isdir(f"/lib/modules/{os.uname().release}/build")
    headers = r["kernel headers"]
    assert headers[0] == ("ok" if matching else "warn")
    if not matching:
        assert headers[1].startswith("fallback") and "BTF" in headers[1]
    # every catalog target has a symbol row; absent ones say so
    assert r["symbol kvm_gpc_refresh"][0] in ("ok", "no")
    with open("/proc/kallsyms") as f:
        has_xen = any(line.split()[2] == "kvm_xen_set_evtchn_fast" for line in f)
    assert (r["symbol kvm_xen_set_evtchn_fast"][0] == "ok") == has_xen
    from kvmlockprof import catalog             # each probe's cost class and default
    for probe in catalog.CATALOG:
        default, detail = r[f"probe {probe.name} cost"]
        assert default == ("off" if probe.opt_in else "on") and probe.fires in detail


def test_probes_say_why_not(live):
    """`probes` gives, per probe, the method or the precise reason."""
    has_kprobes = os.path.exists("/sys/bus/event_source/devices/kprobe") or \
        os.path.exists("/sys/kernel/tracing/kprobe_events")
    out = klp("probes").stdout
    blocks = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            name = line.split()[0]
        elif line.strip().startswith("here: "):
            blocks[name] = line.strip()[len("here: "):]
    assert blocks["contention"] == "raw_tracepoint"
    with open("/proc/kallsyms") as f:
        syms = {line.split()[2] for line in f}
    if "kvm_xen_set_evtchn_fast" not in syms:
        assert "no symbol kvm_xen_set_evtchn_fast" in blocks["xen_evtchn"]
    if os.uname().machine != "aarch64":
        assert "this probe is for aarch64" in blocks["vgic"]
    if not has_kprobes:
        for name in ("gpc", "srcu", "vms", "xarray"):
            assert blocks[name].startswith("cannot attach"), blocks[name]
            assert "kernel has no kprobes" in blocks[name]
        r = rows(klp("doctor", "-v").stdout)
        if r["fentry load (trial)"][0] == "no":
            for name in ("gpc", "srcu", "vms"):
                assert "fentry: " in blocks[name]
