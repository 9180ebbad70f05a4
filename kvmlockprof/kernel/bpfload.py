"""Compile and load BPF C from bpf/ through bcc, with the host's header set-up."""
import contextlib
import ctypes
import io
import os
import sys
import tempfile
import threading


from kvmlockprof import cdefs
from kvmlockprof.cdefs import BPF_DIR
from kvmlockprof.kernel import bpfcache, handles, tracefs
from kvmlockprof.kernel.headers import find_headers
from kvmlockprof.lazy import np

# Frames kept of each kernel stack (KVMLP_STACK_DEPTH, bpf/kmaps.h): 8 bytes each
# per stack-map entry. The deepest contention stack seen on the lab and host
# workloads had 26 frames; a deeper one loses its outermost frames.
STACK_DEPTH = 32
# A kfunc call as the C writes it (bpf/kfunc.h), and as the kernel takes it
KFUNC_MARK = cdefs.define("kfunc.h", "KVMLP_KFUNC_MARK")
BPF_CALL, BPF_PSEUDO_KFUNC_CALL = 0x85, 2         # include/uapi/linux/bpf.h


class BpfUnavailable(RuntimeError):
    """bcc cannot be imported or cannot compile/load here; the message says why."""


def import_bcc():
    try:
        import bcc
    except ImportError:
        raise BpfUnavailable("bcc's Python bindings are missing: apt-get install "
                             "python3-bpfcc (make setup links them into the venv)") from None
    return bcc


def prefetch_bcc():
    """Import bcc in a thread, beside the start-up's other work: loading libbcc and LLVM
    (~0.1 s) runs outside the GIL. A failure is import_bcc's to report (it imports
    again)."""
    if "bcc" in sys.modules:
        return

    def run():
        with contextlib.suppress(Exception):
            import bcc  # noqa: F401
    threading.Thread(target=run, name="kvmlockprof-import-bcc", daemon=True).start()


@contextlib.contextmanager
def _captured_stderr():
    """clang and libbpf print to fd 2; keep it so a failure can quote it.

    The log is a named file that is removed only on return: LLVM exits the
    process on some errors (e.g. BPF stack overflow), and that text must survive."""
    sys.stderr.flush()
    saved = os.dup(2)
    log = os.path.join(tempfile.gettempdir(), f"kvmlockprof-bpf-compile-{os.getpid()}.log")
    with open(log, "w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        buf = io.BytesIO()
        try:
            yield buf
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.write(tmp.read())
    os.unlink(log)


RAW_TRACEPOINT = 17            # BPF_PROG_TYPE_RAW_TRACEPOINT (bcc's BPF.RAW_TRACEPOINT)


def compile_bpf(source=None, text=None, defines=None, headers=None, cache=False):
    """A bcc BPF object for bpf/<source> (or inline text), tracepoints attached.

    cache: a kept compile of the same C, settings, kernel and bcc is loaded instead
    where there is one (a bpfcache.CachedModule: handles.Module's interface, and
    load_func), and this one kept for the next run (kernel/bpfcache.py).
    Errors become BpfUnavailable with the compiler's or verifier's first lines."""
    headers = headers or find_headers()
    if headers.status == "missing" and not os.path.exists("/sys/kernel/kheaders.tar.xz"):
        raise BpfUnavailable("no kernel headers: apt-get install linux-headers-amd64 "
                             "(any version works as a fallback; offsets come from BTF)")
    os.environ.update(headers.env)
    cflags = list(headers.cflags) + [f"-I{BPF_DIR}", "-Wno-macro-redefined"]
    cflags += [f"-D{k}={v if isinstance(v, str) else int(v)}"
               for k, v in {"KVMLP_STACK_DEPTH": STACK_DEPTH, **(defines or {})}.items()]
    if source:
        text = (BPF_DIR / source).read_text()
    # bcc writes tracefs paths at import; make sure it is mounted first.
    tracefs.mount_tracefs()
    kept = cache and bpfcache.enabled() and bpfcache.key(text, cflags, headers, BPF_DIR)
    if kept and (module := bpfcache.load(kept)) is not None:
        return module
    bcc = import_bcc()
    failure = None
    with _captured_stderr() as err:
        try:
            bpf = bcc.BPF(text=text, cflags=cflags)
        except Exception as e:
            failure = e
        else:
            if kept:
                bpfcache.save(kept, bpf, function_code)
            return bpf
    # (outside the `with`: the captured text is complete only once it has closed)
    raise _unavailable(failure, err) from None


def kfunc_calls(code):
    """The instructions with each kfunc call the C wrote (bpf/kfunc.h: a helper call
    numbered KFUNC_MARK + the kfunc's BTF id) made the kernel's (src_reg
    BPF_PSEUDO_KFUNC_CALL, imm the id, in vmlinux), or None where there is none."""
    insns = np.frombuffer(bytes(code), dtype=[("code", "u1"), ("regs", "u1"),
                                              ("off", "<i2"), ("imm", "<i4")]).copy()
    calls = (insns["code"] == BPF_CALL) & (insns["regs"] == 0) & \
        (insns["imm"] >= KFUNC_MARK)
    if not calls.any():
        return None
    insns["regs"][calls] = BPF_PSEUDO_KFUNC_CALL << 4
    insns["imm"][calls] -= KFUNC_MARK
    return insns.tobytes()


def function_code(bpf, fn):
    """A function's compiled instructions in a bcc module or a kept compile (bytes),
    None if it has none."""
    if isinstance(bpf, bpfcache.CachedModule):
        return bpf.code.get(fn)
    lib = import_bcc().libbcc.lib
    start = lib.bpf_function_start(bpf.module, fn)
    return ctypes.string_at(start, lib.bpf_function_size(bpf.module, fn)) if start else None


def load_tp_btf(bpf, fn, btf_id):
    """A function of a bcc module loaded as a tp_btf program (handles.load_tp_btf: bcc
    0.26 loads none), its kfunc calls made the kernel's: its fd, or OSError."""
    code = function_code(bpf, fn)
    return handles.load_tp_btf(fn, kfunc_calls(code) or code, btf_id)


def _load_patched(bpf, fn, prog_type, code):
    """bcc's load_func with the instructions given (the same length as the compiled
    ones: the module's BTF line and function info still apply)."""
    bcc = import_bcc()
    lib = bcc.libbcc.lib
    buf = ctypes.create_string_buffer(code, len(code))
    fd = lib.bcc_func_load(bpf.module, prog_type, fn, ctypes.cast(buf, ctypes.c_void_p),
                           len(code), lib.bpf_module_license(bpf.module),
                           lib.bpf_module_kern_version(bpf.module), 0, None, 0, None, -1)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"Failed to load BPF program {fn.decode()}: "
                      f"{os.strerror(ctypes.get_errno())}")
    bpf.funcs[fn] = bcc.BPF.Function(bpf, fn, fd)
    return bpf.funcs[fn]


def keep_function(bpf, fn, fd):
    """A program loaded apart (its fd) kept among the module's functions."""
    bpf.funcs[fn] = handles.Function(fn, fd) if isinstance(bpf, handles.Module) else \
        import_bcc().BPF.Function(bpf, fn, fd)
    return bpf.funcs[fn]


def load_func(bpf, fn, prog_type):
    """bpf.load_func(), its kfunc calls made the kernel's (kfunc_calls), a verifier's
    refusal as BpfUnavailable with its reason."""
    if isinstance(bpf, bpfcache.CachedModule):
        try:
            code = bpf.code.get(fn)
            return bpf.load_func(fn, prog_type, code=code and kfunc_calls(code))
        except OSError as e:
            raise BpfUnavailable(str(e)) from None
    failure = None
    with _captured_stderr() as err:
        try:
            code = None if fn in bpf.funcs else function_code(bpf, fn)
            code = code and kfunc_calls(code)
            if code is None:
                return bpf.load_func(fn, prog_type)
            return _load_patched(bpf, fn, prog_type, code)
        except Exception as e:
            failure = e
    raise _unavailable(failure, err) from None


def _unavailable(failure, err):
    """BpfUnavailable for a failed compile or load, from its captured output."""
    text = err.getvalue().decode(errors="replace").strip()
    return BpfUnavailable(f"{failure}: {_reason(text.splitlines())}{_keep_log(text)}"
                          .strip(": "))


def _reason(lines):
    """The line of a compiler's or verifier's output that says why: the verifier
    ends with its statistics ("processed N insns"), its reason is the line before."""
    for i, line in enumerate(lines):
        if line.startswith("processed ") and " insns " in line and i:
            return lines[i - 1].strip()
    return next((m for m in lines if "error" in m.lower()), lines[-1] if lines else "")


LAST_LOG = os.path.join(tempfile.gettempdir(), "kvmlockprof-bpf-last.log")


def _keep_log(text):
    """A verifier's or compiler's whole log, kept where the error can name it (it runs
    to thousands of lines: the one-line error cannot carry it). One file, the last
    refusal's: a refusal a kernel repeats on every run must not fill /tmp; a
    feature the kernel lacks (fentry: EPERM, no log worth reading) is not kept."""
    lines = text.splitlines()
    if not any(line.startswith("processed ") or "error:" in line for line in lines):
        return ""
    try:
        fd, tmp = tempfile.mkstemp(prefix="kvmlockprof-bpf-", dir=os.path.dirname(LAST_LOG))
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, LAST_LOG)       # (replaces a link there, never follows it)
    except OSError:
        return ""
    return f" (whole log: {LAST_LOG})"


def event_dtype(table):
    """numpy dtype of the struct a ring buffer carries, as bcc parsed it from the C."""
    if getattr(table, "event_type", None) is not None:         # (a kept compile's)
        return np.dtype(table.event_type)
    scratch = ctypes.create_string_buffer(4096)
    return np.dtype(type(table.event(scratch)))


def stack_addrs(table, stack_id):
    """The frames of a stack in a stack-trace map, innermost first."""
    ips = table[table.Key(stack_id)].ip
    return list(ips[:next((i for i, a in enumerate(ips) if not a), len(ips))])


def table_dtypes(table):
    """numpy dtypes of a map's key and value, as bcc parsed them from the C.

    (A per-CPU map's Leaf is an array over CPUs: the value is its element.)"""
    leaf = np.dtype(table.Leaf)
    return np.dtype(table.Key), leaf.base if leaf.subdtype else leaf


def release_memory():
    """Give freed heap back to the system: after bcc's compile and the BTF dump
    (hundreds of MB of transient objects), a long `record` should not keep them."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass                    # not glibc
