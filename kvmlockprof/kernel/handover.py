"""Load in a child, run in the parent: bcc's compile (LLVM and clang, ~250 MB while
they run, ~150 MB of it kept mapped and dirty after) happens in a forked child,
which hands the loaded programs, maps and attachments back as fds (SCM_RIGHTS) and
exits without detaching anything: the process that records for hours never maps
LLVM (docs/scale.md, bench/README.md "Memory")."""
import contextlib
import ctypes
import errno
import io
import os
import pickle
import signal
import socket
import struct
import tempfile

from kvmlockprof import catalog
from kvmlockprof.probe import Probe
from kvmlockprof.kernel import handles

_FDS_PER_MESSAGE = 200          # SCM_RIGHTS takes at most 253 a message
# The last loader child's peak resident memory (its rusage's ru_maxrss, kB): what
# the compile cost, reported beside the long-lived process's own (record's manifest).
last_peak_rss_kb = None


class _Pickler(pickle.Pickler):
    """Catalog probes (with lambdas in them) travel by name."""

    def persistent_id(self, obj):
        if isinstance(obj, Probe) and catalog.BY_NAME.get(obj.name) is obj:
            return ("probe", obj.name)
        return None


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid):
        return catalog.BY_NAME[pid[1]]


def _portable(exc):
    """The child's exception, or a RuntimeError saying it (its attributes kept) where
    it does not pickle."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        out = RuntimeError(f"{type(exc).__name__}: {exc}")
        vars(out).update({k: v for k, v in vars(exc).items() if _picklable(v)})
        return out


def _picklable(v):
    try:
        pickle.dumps(v)
        return True
    except Exception:
        return False


def _dumps(payload):
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(payload)
    return buf.getvalue()


def _send(sock, data, fds):
    numbers = struct.pack(f"{len(fds)}i", *fds)
    chunks = [fds[i:i + _FDS_PER_MESSAGE] for i in range(0, len(fds), _FDS_PER_MESSAGE)]
    sock.sendall(struct.pack("QII", len(data), len(fds), len(chunks)))
    for c in chunks:
        socket.send_fds(sock, [b"f"], c)
    sock.sendall(numbers + data)


def _recv_exact(sock, n):
    out = bytearray()
    while len(out) < n:
        b = sock.recv(n - len(out))
        if not b:
            raise EOFError
        out += b
    return bytes(out)


def _recv(sock):
    """(the payload, pickled; {the child's fd number: ours}). Every fd received is
    closed if the rest does not arrive whole."""
    fds = []
    try:
        n, nfds, nchunks = struct.unpack("QII", _recv_exact(sock, 16))
        for _ in range(nchunks):
            size = socket.CMSG_SPACE(_FDS_PER_MESSAGE * 4)
            msg, anc, flags, _ = sock.recvmsg(1, size, socket.MSG_CMSG_CLOEXEC)
            for level, kind, body in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += struct.unpack(f"{len(body) // 4}i", body[:len(body) - len(body) % 4])
            if not msg:
                raise EOFError
            if flags & socket.MSG_CTRUNC:
                raise OSError(errno.EMFILE, "the loader's fds did not all arrive (out of "
                                            "file descriptors: raise `ulimit -n`)")
        if len(fds) != nfds:
            raise OSError(errno.EMFILE, f"{len(fds)} of the loader's {nfds} fds arrived")
        numbers = struct.unpack(f"{nfds}i", _recv_exact(sock, 4 * nfds))
        return _recv_exact(sock, n), dict(zip(numbers, fds))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _loads(data, fds):
    """The child's payload, its fds renumbered to ours (handles.REMAP)."""
    handles.REMAP.clear()
    handles.REMAP.update(fds)
    try:
        return _Unpickler(io.BytesIO(data)).load()
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        handles.REMAP.clear()


def _child_died(pid, status):
    """Why a child that sent nothing ended: LLVM exits the process on some errors,
    and bpfload keeps its output in a log named by the child's pid."""
    from kvmlockprof.kernel.bpfload import BpfUnavailable, _reason
    log = os.path.join(tempfile.gettempdir(), f"kvmlockprof-bpf-compile-{pid}.log")
    text = ""
    with contextlib.suppress(OSError):
        with open(log, errors="replace") as f:
            text = f.read().strip()
        os.unlink(log)
    how = (f"signal {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
           else f"exit code {os.waitstatus_to_exitcode(status)}")
    return BpfUnavailable(f"the BPF loader process ended ({how})"
                          + (f": {_reason(text.splitlines())}" if text else ""))


def _reap(pid):
    """The child's wait status, its peak memory kept (last_peak_rss_kb)."""
    global last_peak_rss_kb
    try:
        _, status, usage = os.wait4(pid, 0)
    except ChildProcessError:
        return 0
    last_peak_rss_kb = usage.ru_maxrss
    return status


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _child(sock, fn, fds_of, parent_pid):
    """The loader child's life: it never returns (os._exit), never runs the
    parent's signal handlers or unwinding, never outlives the parent."""
    code = 1
    try:
        for sig in _SIGNALS:                # (a Ctrl-C reaches the whole group: go)
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:
            os._exit(1)                     # (the parent died before the prctl)
        try:
            result = fn()
            fds = list(fds_of(result))
            data = _dumps(("ok", result))
        except BaseException as e:                      # noqa: B036 (sent to the parent)
            data, fds = _dumps(("error", _portable(e))), []
        _send(sock, data, fds)
        code = 0
    finally:
        os._exit(code)


def run(fn, fds_of):
    """fn() in a forked child; its result here, with the fds fds_of(result) lists
    renumbered (handles.REMAP, read by what unpickles them) and close-on-exec. fn's
    exception is raised here. The child exits at once after sending (os._exit:
    bcc's atexit cleanup would detach what it handed over)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    me = os.getpid()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)     # (until the child's own)
    try:
        pid = os.fork()
        if pid == 0:
            parent.close()
            _child(child, fn, fds_of, me)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    child.close()
    reaped = False
    try:
        try:
            data, fds = _recv(parent)
        except EOFError:
            status = _reap(pid)
            reaped = True
            raise _child_died(pid, status) from None
        except BaseException:               # (interrupted here: the child goes too)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            raise
        status, value = _loads(data, fds)
    finally:
        parent.close()
        if not reaped:
            _reap(pid)
    if status == "error":
        raise value
    return value
