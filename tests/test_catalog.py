"""Catalog aliases resolve on this kernel and on a saved 6.1 symbol list."""
import os

import pytest

from kvmlockprof import catalog
from kvmlockprof.kernel import ksyms
from kvmlockprof.probes.functions import target_defines

DATA = os.path.join(os.path.dirname(__file__), "data")


def symbols_61():
    with open(os.path.join(DATA, "symbols-6.1.0-56-amd64.txt")) as f:
        return {line.strip(): "kvm" for line in f if line.strip() and not line.startswith("#")}


def target(probe, key):
    return next(t for t in catalog.BY_NAME[probe].targets if t.key == key)


def test_61_aliases():
    syms = symbols_61()
    assert catalog.resolve_symbol(target("gpc", "GPC_REFRESH"), syms) == \
        "kvm_gfn_to_pfn_cache_refresh"
    assert catalog.resolve_symbol(target("gpc", "GPC_CHECK"), syms) == \
        "kvm_gfn_to_pfn_cache_check"
    assert catalog.resolve_symbol(target("xarray", "XA_ERASE"), syms) == "xa_erase"
    assert catalog.resolve_symbol(target("srcu", "SRCU_LOCK"), syms) == "__srcu_read_lock"
    assert catalog.resolve_symbol(target("xen_evtchn", "XEN_FAST"), syms) is None  # KVM_XEN=n


def test_this_kernel_aliases():
    syms = ksyms.text_symbols()
    if "kvm_vm_ioctl" not in syms:
        pytest.skip("KVM is not in this kernel")
    ref = target("gpc", "GPC_REFRESH")
    found = catalog.resolve_symbol(ref, syms)
    assert found in ref.symbols
    # the newest name wins where both exist; exactly one exists on real kernels
    assert found == next(s for s in ref.symbols if s in syms)


def test_61_signature_without_btf():
    """With no BTF for the function, argument positions come from the catalog's
    per-alias signature: 6.1's refresh takes (kvm, gpc, gpa, len)."""
    d = target_defines(target("gpc", "GPC_REFRESH"), "kvm_gfn_to_pfn_cache_refresh",
                       catalog.KPROBE, None)
    assert d["KVMLP_A_GPC_REFRESH_GPC"] == 1 and d["KVMLP_N_GPC_REFRESH"] == 4
    assert d["KVMLP_M_GPC_REFRESH"] == catalog.METHOD_CODE[catalog.KPROBE]
    d = target_defines(target("gpc", "GPC_REFRESH"), "kvm_gpc_refresh", catalog.FENTRY, None)
    assert d["KVMLP_A_GPC_REFRESH_GPC"] == 0 and d["KVMLP_N_GPC_REFRESH"] == 2


def test_unknown_probe_lists_valid_ones():
    with pytest.raises(catalog.UnknownProbe, match="valid probes: contention, vms"):
        catalog.select(["contention", "nope"])


def test_every_bpf_file_is_in_the_catalog():
    from kvmlockprof.kernel.bpfload import BPF_DIR
    files = {f for f in os.listdir(BPF_DIR) if f.endswith(".bpf.c")}
    assert files == {p.bpf for p in catalog.CATALOG if p.bpf}


def test_target_keys_are_unique():
    """A target's key names its C macros (KVMLP_M_KEY, ...), global to the module that
    holds every function probe."""
    keys = [t.key for p in catalog.CATALOG for t in p.targets]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)


def test_opt_in_probes_attach_only_when_asked(monkeypatch):
    """Plain record leaves a probe whose measured cost is over the target off, and
    says why in its status; --probes naming it attaches it."""
    from types import SimpleNamespace
    from kvmlockprof.kernel import capabilities
    from kvmlockprof.probes import sources
    opt_in = [p for p in catalog.CATALOG if p.opt_in]
    assert opt_in, "no probe is opt-in: the cost table (bench/README.md) says some are"
    monkeypatch.setattr(capabilities, "probe_host", lambda full=False: None)
    monkeypatch.setattr(capabilities, "plan", lambda p, caps, prefer=None, options=None:
                        SimpleNamespace(ok=True, reason="", method="kprobe"))
    status = {}
    plans = sources._function_plans(None, status, None, lambda m: None)
    for p in opt_in:
        assert p not in plans and status[p.name]["status"] == "not requested"
        assert p.opt_in in status[p.name]["reason"] and "--probes" in status[p.name]["reason"]
    assert {p for p in catalog.CATALOG if not p.opt_in and p.name != "contention"} <= set(plans)
    plans = sources._function_plans(catalog.select([p.name for p in opt_in]), {}, None,
                                    lambda m: None)
    # with what they use (lockorder: vms, which names its lock classes)
    assert set(opt_in) | {catalog.BY_NAME[u] for p in opt_in for u in p.uses} == set(plans)


def test_record_takes_this_boots_trial_verdicts(tmp_path, monkeypatch):
    """An attach trial is made once a boot: record (fresh=False) takes the kept
    verdict, doctor (fresh=True) tries again; another symbol, kernel or boot is
    another trial."""
    from kvmlockprof.kernel import capabilities
    monkeypatch.setattr(capabilities, "TRIALS", str(tmp_path / "run" / "trials.json"))
    tried = []
    monkeypatch.setattr(capabilities, "_trial", lambda text, attach=None: tried.append(text)
                        or "refused")
    first = capabilities._fentry_check("vfs_read", fresh=False)
    again = capabilities._fentry_check("vfs_read", fresh=False)
    assert len(tried) == 1 and (first.ok, first.detail) == (False, "refused")
    assert not again.ok and again.detail.startswith("refused (this boot's trial")
    capabilities._fentry_check("vfs_read", fresh=True)
    capabilities._fentry_check("ksys_read", fresh=False)
    assert len(tried) == 3
    monkeypatch.setattr(capabilities.platform, "release", lambda: "9.9.9-other")
    capabilities._fentry_check("vfs_read", fresh=False)
    assert len(tried) == 4


def test_a_missing_environment_is_no_verdict(tmp_path, monkeypatch):
    """A trial that failed for want of headers or bcc is tried again next run (the user
    may install them), unlike the kernel's refusal."""
    from kvmlockprof.kernel import capabilities
    monkeypatch.setattr(capabilities, "TRIALS", str(tmp_path / "trials.json"))
    tried = []
    monkeypatch.setattr(capabilities, "_trial", lambda text, attach=None: tried.append(text)
                        or "no kernel headers: apt-get install linux-headers-amd64")
    capabilities._fentry_check("vfs_read", fresh=False)
    capabilities._fentry_check("vfs_read", fresh=False)
    assert len(tried) == 2
