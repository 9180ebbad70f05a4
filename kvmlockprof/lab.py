"""`kvmlockprof lab`: run a command inside another kernel, under QEMU, with this
machine's root filesystem shared in (virtme-ng), so the function probes can run
live on a kernel with kprobes, fentry and KVM, stock or patched, without a
reboot. Nested KVM comes from QEMU's emulator (-cpu max exposes SVM).

A lab run is its own process group (virtme-ng, QEMU and whatever they start):
when it times out, is interrupted or fails, the whole group is killed, so that
no QEMU is left running, and the error carries the guest's last lines."""
import collections
import glob
import locale
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

KVM_MODULES = "modprobe kvm_amd 2>/dev/null || modprobe kvm_intel 2>/dev/null; "
# A VM held by a process of its own while the command runs. KVM turns its
# preempt-notifier static key on with the first VM and off with the last, rewriting a
# jump in __schedule each time; under QEMU's TCG that rewrite hung or panicked the
# guest (Oops: int3 at that jump) in the VM-reuse run. Held, the key stays on; the
# command starts once it is (the first VM's flip Oopsed a command already running).
ANCHOR_VM = ("python -c 'import time; from kvmlockprof.workload import kvmapi as k; "
             "k.ioctl(k.open_kvm(), k.CREATE_VM, 0); open(\"/tmp/.kvmlockprof-vm\", \"w\"); "
             "time.sleep(1e9)' 2>/dev/null & "
             "while [ ! -e /tmp/.kvmlockprof-vm ] && kill -0 $! 2>/dev/null; do sleep 0.1; done; ")
# record's handler-cost windows turn BPF run-time stats on and off (BPF_ENABLE_STATS),
# patching the static key in every BPF program's exit (update_prog_stats); under TCG a
# CPU in a probe hit that patch's int3 after it had ended (Oops, the lab's gpc/srcu
# run). Held on by the sysctl, the key is patched once, before anything runs.
HOLD_STATS = "echo 1 > /proc/sys/kernel/bpf_stats_enabled; "
TAIL_LINES = 30         # the guest's last lines an error quotes
# Kernels whose nested guests got stuck (or the lab guest panicked) under QEMU's
# multi-threaded emulator and not, so far, single-threaded (docs/lab.md, "The 6.1 lab's hung runs").
SINGLE_TCG_RELEASES = ("6.1.",)
KILL_GRACE_S = 5.0      # after SIGTERM (and again after SIGKILL) before giving up


class LabError(RuntimeError):
    pass


class LabTimeout(LabError, subprocess.TimeoutExpired):
    """The lab run outlived its timeout and its process group was killed; str()
    quotes the last lines it printed (also in .tail)."""

    def __init__(self, cmd, timeout, tail, output=None, stderr=None, left=(), console=None):
        subprocess.TimeoutExpired.__init__(self, cmd, timeout, output, stderr)
        self.tail, self.left, self.console = tail, list(left), console

    def __str__(self):
        head = (f"the lab run timed out after {self.timeout:g} s; its process group "
                "(virtme-ng, QEMU) was killed")
        if self.left:
            head += f", but these processes of it would not die: {self.left}"
        return head + "\n" + _quote_tail(self.tail) + _quote_console(self.console)


def _version_key(path):
    return [int(x) for x in re.findall(r"\d+", os.path.basename(path))]


def lab_kernels():
    """Debian kernels installed for the lab (not necessarily the running one),
    newest first, those with their modules present."""
    images = [p for p in glob.glob("/boot/vmlinuz-*")
              if os.path.isdir(f"/lib/modules/{os.path.basename(p)[len('vmlinuz-'):]}/kernel")]
    return sorted(images, key=_version_key, reverse=True)


def kernel_config(image, option):
    """An option's value in the config Debian installs beside the image, or None."""
    cfg = image.replace("vmlinuz-", "config-")
    try:
        with open(cfg) as f:
            for line in f:
                if line.startswith(option + "="):
                    return line.strip().split("=", 1)[1]
    except OSError:
        pass
    return None


def find_kernel(release_prefix=None, option=None):
    """The newest lab kernel whose release starts with the prefix and/or whose
    config has `option` set (e.g. CONFIG_KVM_XEN), or None."""
    for k in lab_kernels():
        rel = os.path.basename(k)[len("vmlinuz-"):]
        if release_prefix and not rel.startswith(release_prefix):
            continue
        if option and kernel_config(k, option) not in ("y", "m"):
            continue
        return k
    return None


def default_kernel():
    """The newest installed lab kernel (bookworm-backports' when set up, else 6.1)."""
    kernels = lab_kernels()
    if not kernels:
        raise LabError("no lab kernel installed: run `make lab` (installs Debian's "
                       "linux-image-amd64, QEMU and virtme-ng)")
    return kernels[0]


def default_tcg_thread(kernel):
    """"single" for the kernels in SINGLE_TCG_RELEASES, else "multi" (twice as fast)."""
    rel = os.path.basename(kernel)[len("vmlinuz-"):]
    return "single" if rel.startswith(SINGLE_TCG_RELEASES) else "multi"


def vng_path():
    for cand in (os.path.join(os.path.dirname(sys.executable), "vng"), shutil.which("vng")):
        if cand and os.path.exists(cand):
            return cand
    raise LabError("virtme-ng is missing: run `make lab`")


# The kernel's command line holds at most 2048 bytes (x86 COMMAND_LINE_SIZE) and
# virtme-ng puts --exec on it, base64, after ~850 bytes of its own; one byte more and
# the guest panicked at boot (fortify: strlen overflow in start_kernel), silently,
# since the console goes nowhere. The command therefore goes in a file.
MAX_EXEC = 512


def repo_dir():
    """The directory this kvmlockprof is imported from (the arm64 guest runs it)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def guest_script(command, cwd, arch="x86_64"):
    """The shell script the guest runs: `command` in `cwd`, this venv's PATH first
    (the guest starts with a fresh PATH; arm64: the root's python3, with its wheels
    and this tree on PYTHONPATH), KVM loaded, a VM held (ANCHOR_VM) and BPF stats on
    (HOLD_STATS)."""
    if arch == "arm64":
        from kvmlockprof import labroot
        env = (f"export PATH=/usr/local/bin:$PATH PYTHONPATH="
               f"{shlex.quote(labroot.SITE + ':' + repo_dir())}; ")
    else:
        env = f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:$PATH; "
    return (env + KVM_MODULES + ANCHOR_VM + HOLD_STATS +
            f"cd {shlex.quote(cwd)} && exec {shlex.join(command)}\n")


ARCHES = ("x86_64", "arm64")
# arm64: EL2 for the guest kernel (KVM inside), a GICv3 with an ITS (the vgic LPIs).
ARM64_MACHINE = "-machine virtualization=on,gic-version=3,its=on"


def arm64_kernel():
    from kvmlockprof import labroot
    images = labroot.kernels() if labroot.ready() else []
    if not images:
        raise LabError("no arm64 lab root (Debian arm64, its kernel, bcc): run "
                       "`make lab-arm64`")
    return images[0]


def vng_argv(script, kernel=None, cpus=2, memory="2G", cwd=None, possible_cpus=None,
             verbose=False, tcg_thread=None, arch="x86_64"):
    """The virtme-ng command line that boots `kernel` and runs the shell script at
    path `script` (guest_script's) in `cwd`, which is shared read-write so that what
    the command writes stays on the host. possible_cpus: make the kernel size its
    per-CPU data for that many CPUs (as a big host's), whatever runs:
    possible_cpus=N, which x86 kernels before 6.9 take (6.1 does; 6.12 ignores it).
    verbose: the guest kernel's console goes to stderr too (see Console).
    tcg_thread: QEMU's emulator on one host thread per guest CPU ("multi") or all
    guest CPUs on one ("single": slower, and no CPU ever runs beside another inside
    the emulator); None: default_tcg_thread's for the kernel."""
    if arch not in ARCHES:
        raise LabError(f"no lab for {arch}: choose one of {', '.join(ARCHES)}")
    arm = arch == "arm64"
    kernel = kernel or (arm64_kernel() if arm else default_kernel())
    tcg_thread = tcg_thread or ("multi" if arm else default_tcg_thread(kernel))
    if not os.path.exists(kernel):
        raise LabError(f"no kernel image at {kernel}: give a bzImage/vmlinuz path")
    qemu = "qemu-system-aarch64" if arm else "qemu-system-x86_64"
    if not shutil.which(qemu):
        raise LabError(f"{qemu} is missing: run `make {'lab-arm64' if arm else 'lab'}`")
    cwd = os.path.abspath(cwd or os.getcwd())
    append = ["--append", f"possible_cpus={possible_cpus}"] if possible_cpus else []
    if arm:
        from kvmlockprof import labroot
        # The root is the arm64 tree, read-only in the guest: the shared directories
        # are named guest=host, at the host's paths, their mount points made in it.
        repo = repo_dir()
        inside = not os.path.relpath(cwd, repo).startswith("..")
        shared = ["--root", labroot.ROOT, "--arch", "arm64",
                  "--rwdir", f"{repo}={repo}" if inside else f"{cwd}={cwd}",
                  *([] if inside else ["--rodir", f"{repo}={repo}"])]
        for d in (repo,) if inside else (cwd, repo):
            os.makedirs(labroot.ROOT + d, exist_ok=True)
        machine = ARM64_MACHINE + " "
    else:
        shared, machine = ["--rwdir", cwd], ""
    return [vng_path(), "--run", kernel, "--disable-kvm", "--force-9p", "--cpus", str(cpus),
            "--memory", memory, *shared,
            f"--qemu-opts=-cpu max {machine}-accel tcg,thread={tcg_thread}", *append,
            *(["--verbose"] if verbose else []), "--exec", guest_exec(script)]


def guest_exec(script):
    """virtme-ng's --exec that runs the script at path `script`: short, whatever it runs."""
    line = f"sh {shlex.quote(script)}"
    if len(line) > MAX_EXEC:
        raise LabError(f"the lab's directory path is too long for the guest kernel's "
                       f"command line ({len(line)} > {MAX_EXEC} bytes): run from a shorter one")
    return line


def run(command, kernel=None, cpus=2, memory="2G", cwd=None, timeout=None, possible_cpus=None,
        console=None, tcg_thread=None, arch="x86_64", **popen):
    """Run `command` inside the lab kernel; returns the CompletedProcess.

    Takes subprocess.run's output options (capture_output, stdout, stderr, text,
    check); see run_group for what a timeout or an interrupt does. The guest's
    script is a dot file in `cwd` while it runs. console: a path where the guest
    kernel's console is written (errors quote its last lines).

    Without a terminal, stdin must not be left open to the caller: virtme-ng
    forwards it to the guest, and the guest command then waits on it."""
    if not os.isatty(0):
        popen.setdefault("stdin", subprocess.DEVNULL)
    env = dict(popen.pop("env", None) or os.environ)
    # virtme-ng runs its helpers (virtme-run) from PATH: put the venv's first
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    cwd = os.path.abspath(cwd or os.getcwd())
    try:
        fd, script = tempfile.mkstemp(prefix=".kvmlockprof-lab-", suffix=".sh", dir=cwd)
    except OSError as e:
        raise LabError(f"cannot write the guest's script in {cwd} ({e.strerror}): "
                       f"run from a directory you can write") from e
    con = None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(guest_script(command, cwd, arch))
        con = Console(console) if console else None
        return run_group(vng_argv(script, kernel, cpus, memory, cwd, possible_cpus,
                                  verbose=con is not None, tcg_thread=tcg_thread, arch=arch),
                         timeout=timeout, env=env, console=con, **popen)
    finally:
        os.unlink(script)
        if con:
            con.file.close()            # its pump closes it, unless none ever ran


# --- running a process group ------------------------------------------------------------

def _quote_tail(tail):
    if not tail:
        return "it printed nothing"
    return f"its last {len(tail)} lines:\n" + "\n".join("  | " + line for line in tail)


def _quote_console(console):
    if console is None:
        return ""
    lines = list(console.tail)
    return f"\nthe guest kernel's console ({console.path}): " + \
        (_quote_tail(lines) if lines else "empty")


def group_members(pgid):
    """Live (not zombie) processes of process group `pgid`, from /proc: a zombie
    is dead, and may stay one where PID 1 reaps nothing (containers)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue                        # gone meanwhile
        fields = stat[stat.rfind(b")") + 2:].split()      # after "pid (comm) "
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            out.append(int(d))
    return out


def kill_group(pgid, grace=None):
    """SIGTERM the group, then SIGKILL what is left after `grace` s; returns the
    pids still alive after that (none, unless one is stuck in the kernel)."""
    grace = KILL_GRACE_S if grace is None else grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return []
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not group_members(pgid):
                return []
            time.sleep(0.05)
    return group_members(pgid)


class _Tail:
    """The last lines of the output streams, interleaved as they arrived."""

    PARTIAL_MAX = 4096      # bytes of a line not ended yet kept (the end of it)

    def __init__(self, n):
        self.lines = collections.deque(maxlen=n)
        self.partial = {}
        self.lock = threading.Lock()

    def feed(self, stream, chunk):
        with self.lock:
            data = self.partial.get(stream, b"") + chunk
            *done, rest = data.split(b"\n")
            for line in done:
                self.lines.append(line.rstrip(b"\r").decode(errors="replace"))
            self.partial[stream] = rest[-self.PARTIAL_MAX:]

    def get(self):
        with self.lock:
            out = list(self.lines) + [p.rstrip(b"\r").decode(errors="replace")
                                      for p in self.partial.values() if p.strip()]
        return out[-self.lines.maxlen:]


class Console:
    """The guest kernel's console, split from the stderr it shares under virtme-ng's
    --verbose: every line until the guest starts the command, then the kernel's
    lines (printk's "[  12.345678] "), go to the file at `path` and are kept for
    errors (.tail); what is left is the command's stderr. A guest that panics while
    booting shows it only here."""

    KERNEL_LINE = re.compile(rb"^(\[ *\d+\.\d+\] |\*\* \d+ printk messages dropped)")
    STARTED = b"virtme-ng-init: starting script"

    def __init__(self, path, n=TAIL_LINES):
        self.path, self.file = path, open(path, "wb")
        self.tail = collections.deque(maxlen=n)
        self.partial, self.booting = b"", True

    def _line(self, line):
        """The line if it is the command's (with its newline), else b""."""
        if not (self.booting or self.KERNEL_LINE.match(line)):
            return line + b"\n"
        self.file.write(line + b"\n")
        self.tail.append(line.rstrip(b"\r").decode(errors="replace"))
        self.booting = self.booting and self.STARTED not in line
        return b""

    def split(self, chunk):
        """What of `chunk` is the command's stderr (whole lines only)."""
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        out = b"".join(map(self._line, lines))
        self.file.flush()
        return out

    def close(self):
        """The command's part of a last unended line, if any."""
        rest, self.partial = self.partial, b""
        out = self._line(rest)[:-1] if rest else b""
        self.file.close()
        return out


def _sink_fd(dest, live_fd):
    """Where a stream's bytes go besides the tail: (fd or None, keep them?)."""
    if dest == subprocess.PIPE:
        return None, True
    if dest is None:
        return live_fd, False               # the caller's own stdout/stderr, live
    if dest == subprocess.DEVNULL:
        return None, False
    if isinstance(dest, int):
        return dest, False
    if hasattr(dest, "fileno"):
        if hasattr(dest, "flush"):
            dest.flush()
        return dest.fileno(), False
    raise ValueError(f"unsupported output destination {dest!r}")


class _Pump(threading.Thread):
    """Copies one pipe to its sink (live or kept) and to the tail, until EOF, or
    until stopped (a process that left the group may hold the pipe open)."""

    def __init__(self, pipe, name, sink, keep, tail, console=None):
        super().__init__(name=f"lab-{name}", daemon=True)
        self.fd, self.stream, self.sink, self.tail = pipe.fileno(), name, sink, tail
        self.console = console              # a Console: its lines are taken out first
        self.kept = [] if keep else None
        self.stop = threading.Event()
        self.error = None

    def _take(self, chunk):
        if self.console:
            chunk = self.console.split(chunk)
        self._keep(chunk)

    def _keep(self, chunk):
        if not chunk:
            return
        if self.kept is not None:
            self.kept.append(chunk)
        self.tail.feed(self.stream, chunk)
        if self.sink is not None:
            try:
                while chunk:
                    chunk = chunk[os.write(self.sink, chunk):]
            except OSError as e:            # our own output is gone: keep draining
                self.error, self.sink = e, None

    def run(self):
        poll = select.poll()
        poll.register(self.fd, select.POLLIN)
        try:
            while not self.stop.is_set():
                if poll.poll(100):
                    chunk = os.read(self.fd, 65536)
                    if not chunk:
                        return
                    self._take(chunk)
        except (OSError, ValueError) as e:      # the pipe was closed under us
            self.error = e
        finally:
            if self.console:
                self._keep(self.console.close())

    def data(self):
        return None if self.kept is None else b"".join(self.kept)


def _wait_exit(pid, timeout):
    """Wait until `pid` exits, without reaping it: its zombie keeps its pid, and so
    the group id, ours until the group is cleaned up. False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(delay if deadline is None else
                   max(0.0, min(delay, deadline - time.monotonic())))
        delay = min(delay * 2, 0.05)
    return True


def _decode(data, text, encoding, errors):
    if data is None or not (text or encoding or errors):
        return data
    s = data.decode(encoding or locale.getpreferredencoding(False), errors or "strict")
    return s.replace("\r\n", "\n").replace("\r", "\n")     # as text=True reads


def run_group(argv, timeout=None, check=False, capture_output=False, stdout=None,
              stderr=None, text=None, encoding=None, errors=None, universal_newlines=None,
              tail_lines=TAIL_LINES, grace=None, console=None, **popen):
    """subprocess.run for a command that starts processes of its own (virtme-ng ->
    QEMU), run in a new session, so a process group of its own.

    Its output always passes through here: what the caller asked to capture is
    kept, output the caller did not redirect is copied live to our stdout/stderr
    (or to the file given), and the last `tail_lines` lines are kept in any case.
    When the command ends, whatever is left of its group is killed. On a timeout
    the group is killed (SIGTERM, SIGKILL after `grace` s, KILL_GRACE_S by default),
    reaped, and LabTimeout (a LabError and a TimeoutExpired) quotes the last lines; on
    Ctrl-C the group is killed and KeyboardInterrupt goes on; on any other error,
    LabError. console: a Console, which takes the guest kernel's lines out of stderr;
    errors quote it too."""
    if capture_output:
        if stdout is not None or stderr is not None:
            raise ValueError("capture_output with stdout or stderr")
        stdout = stderr = subprocess.PIPE
    if "input" in popen or "start_new_session" in popen or "process_group" in popen:
        raise ValueError("run_group takes no input and makes its own session")
    text = text or universal_newlines
    grace = KILL_GRACE_S if grace is None else grace
    merged = stderr == subprocess.STDOUT
    sinks = {"stdout": _sink_fd(stdout, 1)}
    if not merged:
        sinks["stderr"] = _sink_fd(stderr, 2)
    sys.stdout.flush()
    sys.stderr.flush()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merged else subprocess.PIPE,
                            start_new_session=True, **popen)
    tail = _Tail(tail_lines)
    pumps = [_Pump(getattr(proc, name), name, sink, keep, tail,
                   console if name == list(sinks)[-1] else None)
             for name, (sink, keep) in sinks.items()]
    left = []
    try:
        for p in pumps:
            p.start()
        finished = _wait_exit(proc.pid, timeout)
        # The command is over (or out of time): nothing of its group may outlive it.
        left = kill_group(proc.pid, grace)
        proc.wait()
        _stop(pumps)
        if not finished:
            raise LabTimeout(argv, timeout, tail.get(), *(p.data() for p in pumps), left=left,
                             console=console)
    except BaseException as e:
        if proc.returncode is None:
            left = kill_group(proc.pid, grace)
            proc.wait()
            _stop(pumps)
        if isinstance(e, LabError):
            raise
        if isinstance(e, KeyboardInterrupt):
            if hasattr(e, "add_note"):          # Python 3.11+
                e.add_note("lab run interrupted; its process group was killed; " +
                           _quote_tail(tail.get()))
            raise
        raise LabError(f"lab run failed ({type(e).__name__}: {e}); its process group "
                       f"was killed; {_quote_tail(tail.get())}{_quote_console(console)}") from e
    finally:
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()
    out, err = (_decode(p.data(), text, encoding, errors) for p in pumps) if not merged else \
        (_decode(pumps[0].data(), text, encoding, errors), None)
    if left:
        raise LabError(f"the lab run ended but these processes of its group would not die: "
                       f"{left}")
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, argv, out, err)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _stop(pumps, drain=2.0):
    """Let the pumps read to EOF (the group is gone, so the pipes close), at most
    `drain` s, then stop them."""
    started = [p for p in pumps if p.ident is not None]
    deadline = time.monotonic() + drain
    for p in started:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in started:
        p.stop.set()
        p.join()
