"""The loader child's handover (kernel/handover.py) and the fd-held module
(kernel/handles.py): fds arrive usable, errors arrive as themselves, a dead child
is reported; ctypes layouts survive the trip (ctypes itself is the judge); the
handed-over tables read as bcc's own do (bcc is the judge)."""
import ctypes as ct
import os
import subprocess

import pytest

from kvmlockprof.kernel import bpfload, handles, handover


class Pipe:
    """A stand-in for a source: an object holding fds it made."""

    def __init__(self, fd):
        self.fd = fd

    def __reduce__(self):
        return _pipe, (self.fd,)


def _pipe(fd):
    return Pipe(handles.remap(fd))          # (in the parent, while it unpickles)


def test_fds_come_over_renumbered_and_usable():
    def child():
        pipes = [os.pipe() for _ in range(300)]         # more than one SCM_RIGHTS message
        for i, (r, w) in enumerate(pipes):
            os.write(w, f"{i}".encode())
            os.close(w)
        return [Pipe(r) for r, _ in pipes]

    got = handover.run(child, lambda pipes: [p.fd for p in pipes])
    try:
        assert [os.read(p.fd, 10) for p in got] == [f"{i}".encode() for i in range(300)]
    finally:
        for p in got:
            os.close(p.fd)


def test_the_childs_error_is_raised_here():
    def child():
        raise bpfload.BpfUnavailable("no kernel headers: apt-get install linux-headers-amd64")
    with pytest.raises(bpfload.BpfUnavailable, match="apt-get install"):
        handover.run(child, lambda r: [])

    class Local(Exception):                     # (a class pickle cannot name)
        pass

    def child2():
        e = Local("odd")
        e.kvmlockprof_warnings = ["a warning"]
        raise e
    with pytest.raises(RuntimeError, match="Local: odd") as info:
        handover.run(child2, lambda r: [])
    assert info.value.kvmlockprof_warnings == ["a warning"]


def test_a_child_that_dies_is_reported_with_its_compile_log():
    def child():
        import tempfile
        log = os.path.join(tempfile.gettempdir(), f"kvmlockprof-bpf-compile-{os.getpid()}.log")
        with open(log, "w") as f:
            f.write("fatal error: error in backend: Looks like the BPF stack limit is exceeded\n")
        os._exit(1)                             # as LLVM exits on that error
    with pytest.raises(bpfload.BpfUnavailable,
                       match=r"loader process ended \(exit code 1\).*stack limit"):
        handover.run(child, lambda r: [])


class Inner(ct.Structure):
    _fields_ = [("a", ct.c_uint8), ("b", ct.c_uint64)]


class Packed(ct.Structure):
    _pack_ = 1
    _fields_ = [("x", ct.c_uint8), ("y", ct.c_uint32)]


class Anon(ct.Union):
    _fields_ = [("u", ct.c_uint32), ("s", ct.c_int16 * 2)]


class Outer(ct.Structure):
    _anonymous_ = ["__anon0"]
    _fields_ = [("inner", Inner), ("arr", ct.c_uint64 * 3), ("packed", Packed),
                ("__anon0", Anon), ("bits", ct.c_uint32, 3), ("more", ct.c_uint32, 5),
                ("name", ct.c_char * 16)]


def _layout(t):
    return [(n, getattr(t, n).offset, getattr(t, n).size) for n, *_ in t._fields_]


def test_ctypes_layouts_survive_the_trip():
    import pickle
    for t in (ct.c_uint64, ct.c_int, Inner, Packed, Anon, Outer, Outer * 2):
        back = handles.build_type(pickle.loads(pickle.dumps(handles.type_spec(t))))
        assert ct.sizeof(back) == ct.sizeof(t) and ct.alignment(back) == ct.alignment(t)
        if hasattr(t, "_fields_"):
            assert _layout(back) == _layout(t)
    o = handles.build_type(handles.type_spec(Outer))()
    o.u = 7                                      # the anonymous union's field, reached
    assert o.__anon0.u == 7


def test_handed_over_tables_read_as_bccs_own(live):
    """The contention probe loaded here (bcc's objects), its maps read through bcc and
    through handles.Module over the same fds, after real waits."""
    from kvmlockprof.kernel.maps import read_counters, read_hash_parts
    from kvmlockprof.probes.contention import COUNTERS, ContentionOptions, ContentionProbe
    from conftest import workload_argv
    probe = ContentionProbe(ContentionOptions(sample_every=1))
    try:
        subprocess.run(workload_argv("--duration", 1, "--vcpus", 2, "--churn"), check=True,
                       capture_output=True, timeout=60)
        probe.detach()
        mod = handles.Module.from_bcc(probe.bpf)
        theirs, ours = probe.bpf["agg"], mod["agg"]
        assert len(ours.items()) == len(theirs.items()) > 0
        assert {bytes(k): bytes(v) for k, v in ours.items()} == \
            {bytes(k): bytes(v) for k, v in theirs.items()}
        assert read_counters(mod["counters"], COUNTERS) == \
            read_counters(probe.bpf["counters"], COUNTERS)
        kb, vb = read_hash_parts(mod["agg"])
        assert sorted(kb.tobytes()[i:i + kb.itemsize] for i in range(0, kb.nbytes, kb.itemsize)) \
            == sorted(bytes(k) for k in theirs.keys())
        sid = next(k.stack_id for k in theirs.keys() if k.stack_id >= 0)
        assert list(mod["stacks"][sid].ip) == list(probe.bpf["stacks"][ct.c_int(sid)].ip)
        assert set(mod.funcs) >= {b"raw_tracepoint__contention_begin",
                                  b"raw_tracepoint__contention_end"}
    finally:
        probe.close()


def test_the_function_probes_come_over_whole(bpf_host):
    """Every function probe (kprobe flavour: this host cannot attach them; the lab
    does) loaded in a child and handed over: its programs, tables and rings usable
    here, its status and plans intact, and everything closed by close()."""
    from conftest import assert_none_left, kernel_objects
    from kvmlockprof import catalog
    from kvmlockprof.kernel import btf
    from kvmlockprof.probes.functions import FunctionProbes, forced_plans
    probes = [p for p in catalog.CATALOG if p.name != "contention"]
    before = kernel_objects()

    def load():
        fp = FunctionProbes(forced_plans(probes, catalog.KPROBE), btf.Btf(), attach=False)
        fp.load_kprobe_handlers()
        fp.hand_over()
        return fp
    fp = handover.run(load, lambda fp: fp.bpf.fds())
    try:
        assert list(fp.plans) == probes and fp.plans[probes[0]].__class__.__name__ == "Plan"
        assert {p.name for p in probes} == set(fp.status)
        for p in probes:
            for fn, _, _ in fp.kprobe_functions(p):
                assert fn.encode() in fp.bpf.funcs
        assert fp.counters() is not None and fp.snapshots()
        assert {t: len(a) for t, a in fp.poll().items()} == {t: 0 for t in fp.rings}
    finally:
        fp.detach()
        fp.close()
    assert_none_left(before)


def _map(map_type, key, value, entries):
    """A map made through libbpf (not bcc): its fd."""
    b = handles.lib()
    b.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                 ct.c_uint32, ct.c_void_p]
    fd = b.bpf_map_create(map_type, b"kvmlp_test", ct.sizeof(key), ct.sizeof(value),
                          entries, None)
    assert fd >= 0, os.strerror(-fd)
    return fd


def test_tables_read_as_the_kernel_keeps_them(bpf_host):
    """A hash keyed from 0, an array, a per-CPU array of a value not 8 bytes long:
    every entry, deletes, and each CPU's value where the kernel puts it (its 8-byte
    stride)."""
    spec = handles.type_spec
    fds = [_map(1, ct.c_uint32, ct.c_uint64, 8), _map(2, ct.c_uint32, ct.c_uint64, 4),
           _map(6, ct.c_uint32, ct.c_uint32, 2)]
    try:
        h = handles.Table("h", fds[0], 1, 8, spec(ct.c_uint32), spec(ct.c_uint64))
        for k in (0, 1, 7):
            h[ct.c_uint32(k)] = ct.c_uint64(k * 10)
        assert sorted((k.value, v.value) for k, v in h.items()) == [(0, 0), (1, 10), (7, 70)]
        assert len(h) == 3 and h.get(ct.c_uint32(5)) is None
        del h[ct.c_uint32(0)]
        assert h.lookup_and_delete(ct.c_uint32(1)).value == 10 and len(h) == 1
        a = handles.Table("a", fds[1], 2, 4, spec(ct.c_uint32), spec(ct.c_uint64))
        a[2] = ct.c_uint64(5)
        assert len(a) == 4 and [v.value for _, v in a.items()] == [0, 0, 5, 0]
        del a[2]
        assert a[2].value == 0                  # (an array's entry is zeroed)
        p = handles.Table("p", fds[2], 6, 2, spec(ct.c_uint32), spec(ct.c_uint32))
        ncpu = len(p.Leaf())
        raw = (ct.c_uint64 * ncpu)(*[(c + 1) * 3 for c in range(ncpu)])   # the kernel's view
        assert handles.lib().bpf_map_update_elem(fds[2], ct.byref(ct.c_uint32(1)),
                                                 ct.byref(raw), 0) == 0
        assert list(p.getvalue(1)) == [(c + 1) * 3 for c in range(ncpu)]
    finally:
        for fd in fds:
            os.close(fd)
