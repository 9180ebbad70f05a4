"""The BTF reader against bpftool's (libbpf's) reading of the same kernel: every type,
the parts kvmlockprof reads of it."""
import json
import os
import re
import shutil
import subprocess

import pytest

from kvmlockprof.kernel import btf

VMLINUX = os.path.join(btf.BTF_DIR, "vmlinux")
pytestmark = pytest.mark.skipif(not os.path.exists(VMLINUX) or not shutil.which("bpftool"),
                                reason="no kernel BTF or no bpftool")

# per kind, the keys of bpftool's JSON this project reads
KEYS = {"STRUCT": ("name", "size", "vlen"), "UNION": ("name", "size", "vlen"),
        "ARRAY": ("type_id", "index_type_id", "nr_elems"), "ENUM": ("name", "size"),
        "ENUM64": ("name", "size"), "FUNC": ("name", "type_id"),
        "FUNC_PROTO": ("ret_type_id", "vlen"), "VAR": ("name", "type_id"),
        "DATASEC": ("name", "size"), "PTR": ("type_id",), "INT": ("name", "size")}
KEYS.update({q: ("name", "type_id") for q in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT",
                                              "TYPE_TAG")})
LISTS = {"members": ("name", "type_id", "bits_offset", "bitfield_size"),
         "values": ("name", "val"), "params": ("name", "type_id"),
         "vars": ("type_id", "offset", "size")}


def bpftool(path, base=None):
    cmd = ["bpftool", "-j"] + (["-B", base] if base else []) + ["btf", "dump", "file", path]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                     check=True).stdout)["types"]


def project(t):
    out = {"kind": t["kind"], **{k: t.get(k) for k in KEYS.get(t["kind"], ())}}
    for k, fields in LISTS.items():
        if k in t:
            out[k] = [{f: x.get(f) for f in fields} for x in t[k]]
    if t["kind"] == "ENUM" and t.get("encoding") != "SIGNED":  # (bpftool sign-extends
        # an unsigned 32-bit value to 64 bits)
        out["values"] = [{**v, "val": v["val"] % 2**32} for v in out["values"]]
    return out


@pytest.mark.parametrize("module", [None] + btf.Btf.kvm_modules()[:1])
def test_every_type_as_bpftool_reads_it(module):
    base = btf.read(VMLINUX)
    raw = btf.read(os.path.join(btf.BTF_DIR, module), base=base) if module else base
    theirs = bpftool(os.path.join(btf.BTF_DIR, module), VMLINUX) if module else \
        bpftool(VMLINUX)
    theirs = [t for t in theirs if t["id"] >= raw.first]
    assert len(theirs) == len(raw.offsets)
    for t in theirs:
        assert project(raw.get(t["id"])) == project(t), t["id"]


def test_btf_indexes_and_layouts():
    kb = btf.Btf(modules=[])
    theirs = {t["name"]: t for t in bpftool(VMLINUX) if t["kind"] == "STRUCT"}
    assert kb.size("task_struct") == theirs["task_struct"]["size"]
    pid = next(m for m in theirs["task_struct"]["members"] if m["name"] == "pid")
    assert kb.offset("task_struct", "pid") == pid["bits_offset"] // 8
    assert "schedule" in kb.funcs and kb.func_params("schedule") == []
    assert kb.enums["zone_type"] and "ZONE_NORMAL" in kb.enums["zone_type"].values()


def test_per_cpu_offsets_as_bpftool_reads_them():
    """The per-CPU section's variables (x86's __preempt_count is found from the run
    queue's address by their distance: bpf/contention.bpf.c) at bpftool's offsets; a
    variable the kernel lacks is -1."""
    theirs = bpftool(VMLINUX)
    by_id = {t["id"]: t for t in theirs}
    sec = next(t for t in theirs if t["kind"] == "DATASEC" and t["name"] == btf.PERCPU)
    offs = {by_id[v["type_id"]]["name"]: v["offset"] for v in sec["vars"]}
    names = ["runqueues", "__preempt_count" if "__preempt_count" in offs else
             next(iter(offs))]
    got = btf.defines(btf.Btf(modules=[]), {**{n: (btf.PERCPU, n) for n in names},
                                           "NOPE": (btf.PERCPU, "no_such_variable")})
    assert got == {**{n: offs[n] for n in names}, "NOPE": -1}


def test_not_btf_says_so(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"\x7fELF" + bytes(40))
    with pytest.raises(btf.BtfError, match="not BTF"):
        btf.read(str(p))


def test_the_kernels_offsets_are_kept_per_boot(tmp_path, monkeypatch):
    """kernel_defines reads the BTF once a boot: the next run takes the kept offsets
    (equal to the BTF's), another field list or another boot reads it again, and a
    kernel without BTF keeps nothing."""
    from kvmlockprof.kernel import host
    monkeypatch.setattr(btf, "OFFSETS", str(tmp_path / "run" / "offsets.json"))
    reads = []

    def load():
        reads.append(1)
        return btf.Btf(modules=[])
    fields = {"TASK_PID": ("task_struct", "pid"), "NOPE": ("task_struct", "no_such")}
    first = btf.kernel_defines(fields, load)
    assert first == btf.defines(btf.Btf(modules=[]), fields) and first["NOPE"] == -1
    assert btf.kernel_defines(fields, load) == first and len(reads) == 1
    btf.kernel_defines({"TASK_MM": ("task_struct", "mm")}, load)
    assert len(reads) == 2
    monkeypatch.setattr(host, "boot_id", lambda: "another boot")
    assert btf.kernel_defines(fields, load) == first and len(reads) == 3
    monkeypatch.setattr(host, "boot_id", lambda: "a kernel without BTF")
    assert btf.kernel_defines(fields, lambda: None) == {"TASK_PID": -1, "NOPE": -1}
    assert "a kernel without BTF" not in " ".join(host.kept(btf.OFFSETS))


def test_lock_paths_are_lock_at_at_every_offset():
    """The lock paths made once per per-CPU variable (KernelNamer keeps them, not the
    BTF) are lock_at's at every byte of every variable: none missed, none added."""
    kb = btf.Btf(modules=[])
    pv, _ = kb.percpu_vars()
    assert pv
    found = 0
    for _, size, name, tid in pv:
        theirs = {o: p for o in range(size) if (p := kb.lock_at(tid, o)) is not None}
        assert kb.lock_paths(tid) == theirs, name
        found += len(theirs)
    assert found > 10               # (timer_bases, the run queues' locks, ...)


def test_kfunc_ids_as_bpftool_reads_them():
    """A kfunc's id is its FUNC's in vmlinux's BTF (bpftool's); an absent one has none
    and its define is -1."""
    dump = subprocess.run(["bpftool", "btf", "dump", "file", VMLINUX], capture_output=True,
                          text=True, check=True).stdout
    kb = btf.Btf(modules=[])
    for name in ("bpf_get_kmem_cache", "bpf_task_from_pid", "vfs_read"):
        ids = [int(i) for i in re.findall(rf"^\[(\d+)\] FUNC '{name}' ", dump, re.M)]
        assert btf.kfunc_id(kb, name) == (ids[0] if ids else None)
    assert btf.kfunc_id(kb, "no_such_kfunc") is None
    assert btf.defines(kb, {"K": (btf.KFUNC, "no_such_kfunc")}) == {"K": -1}


def test_kfunc_calls_rewritten_as_the_kernel_takes_them():
    """The C's kfunc call (bpf/kfunc.h: a helper numbered the mark plus the BTF id)
    becomes a BPF_PSEUDO_KFUNC_CALL of that id (include/uapi/linux/bpf.h: src_reg 2);
    helper calls and other instructions stay as they were; none: None."""
    import struct
    from kvmlockprof.kernel import bpfload
    ins = lambda code, regs, off, imm: struct.pack("<BBhi", code, regs, off, imm)  # noqa
    helper, ld = ins(0x85, 0, 0, 14), ins(0xb7, 1, 0, 0x40000000 + 7)
    code = helper + ins(0x85, 0, 0, 0x40000000 + 63456) + ld + ins(0x95, 0, 0, 0)
    got = bpfload.kfunc_calls(code)
    assert got == helper + ins(0x85, 0x20, 0, 63456) + ld + ins(0x95, 0, 0, 0)
    assert bpfload.kfunc_calls(helper + ld) is None
