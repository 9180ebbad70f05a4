"""Kept compiles (kernel/bpfcache.py), checked by the kernel's own view of what runs:
each program's tag (the kernel's hash of its instructions, bpftool's `tag`) and each
map's size (/proc/PID/fdinfo) of a probe loaded from the cache equal those of the
same settings compiled by bcc; two settings keep two entries and each run loads its
own; a corrupt entry is compiled again."""
import json
import os
import subprocess

import pytest

from kvmlockprof.kernel import bpfcache, handles
from kvmlockprof.probes.contention import ContentionOptions, ContentionProbe

HANDLERS = (b"raw_tracepoint__contention_begin", b"raw_tracepoint__contention_end")
# two settings: map sizes differ, and so does the code (a process filter or none)
SETTINGS = {"small, whole host": (ContentionOptions(map_entries=1024), None),
            "large, one process": (ContentionOptions(map_entries=2048), [os.getpid()])}


def _fdinfo(fd):
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return dict(ln.split(":", 1) for ln in f.read().splitlines() if ":" in ln)


def _tag(fd):
    prog_id = _fdinfo(fd)["prog_id"].strip()
    out = subprocess.run(["bpftool", "prog", "show", "id", prog_id, "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["tag"]


def _seen(probe):
    """What the kernel runs of a probe: its handlers' tags, its maps' max_entries."""
    return ({fn: _tag(probe.bpf.funcs[fn].fd) for fn in HANDLERS},
            {n: int(_fdinfo(handles.table(probe.bpf, n).map_fd)["max_entries"])
             for n in ("agg", "stacks", "events", "pending")})


def _open(settings, cache=True):
    opts, tgids = SETTINGS[settings]
    p = ContentionProbe(opts, tgids=tgids, cache=cache)
    try:
        return p.options["compiled"], _seen(p)
    finally:
        p.close()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "bpf"
    monkeypatch.setattr(bpfcache, "CACHE_DIR", str(d))
    return d


def test_each_setting_loads_its_own_kept_compile(live, cache_dir):
    fresh = {s: _open(s, cache=False)[1] for s in SETTINGS}
    assert fresh["small, whole host"] != fresh["large, one process"]
    for s in SETTINGS:
        how, seen = _open(s)
        assert how == "now" and seen == fresh[s], s
    assert len(list(cache_dir.glob("*.json"))) == 2
    for s in reversed(list(SETTINGS)):
        how, seen = _open(s)
        print(s, how, seen)
        assert how == "kept", s
        assert seen == fresh[s], s
    assert fresh["small, whole host"][1]["agg"] == 1024
    assert fresh["large, one process"][1]["agg"] == 2048


def test_a_corrupt_entry_is_compiled_again(live, cache_dir):
    assert _open("small, whole host")[0] == "now"
    (entry,) = cache_dir.glob("*.json")
    good = entry.read_text()
    for bad in (good[:len(good) // 2], good.replace('"contention_begin"', '"no_such_tp"')):
        entry.write_text(bad)
        how, seen = _open("small, whole host")
        assert how == "now"
        assert seen == _open("small, whole host", cache=False)[1]
        assert json.loads(entry.read_text())["key"] == entry.stem       # kept anew
    assert _open("small, whole host")[0] == "kept"
