"""`kvmlockprof lab`: run a command inside another kernel, under QEMU, with this
machine's root filesystem shared in (virtme-ng), so the function probes can run
live on a kernel with kprobes, fentry and KVM, stock or patched, without a
reboot. Nested KVM comes from QEMU's emulator (-cpu max exposes SVM)."""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

KVM_MODULES = "modprobe kvm_amd 2>/dev/null || modprobe kvm_intel 2>/dev/null; "


class LabError(RuntimeError):
    pass


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


def vng_path():
    for cand in (os.path.join(os.path.dirname(sys.executable), "vng"), shutil.which("vng")):
        if cand and os.path.exists(cand):
            return cand
    raise LabError("virtme-ng is missing: run `make lab`")


def vng_argv(command, kernel=None, cpus=2, memory="2G", cwd=None):
    """The virtme-ng command line that boots `kernel` and runs `command` in `cwd`,
    which is shared read-write so that what the command writes stays on the host."""
    kernel = kernel or default_kernel()
    if not os.path.exists(kernel):
        raise LabError(f"no kernel image at {kernel}: give a bzImage/vmlinuz path")
    if not shutil.which("qemu-system-x86_64"):
        raise LabError("qemu-system-x86_64 is missing: run `make lab`")
    cwd = os.path.abspath(cwd or os.getcwd())
    # the guest starts with a fresh PATH: put this venv's (kvmlockprof, bcc) first
    venv_bin = os.path.dirname(sys.executable)
    script = (f"export PATH={shlex.quote(venv_bin)}:$PATH; " + KVM_MODULES +
              f"cd {shlex.quote(cwd)} && " + shlex.join(command))
    return [vng_path(), "--run", kernel, "--disable-kvm", "--force-9p", "--cpus", str(cpus),
            "--memory", memory, "--rwdir", cwd, "--qemu-opts=-cpu max", "--exec", script]


def run(command, kernel=None, cpus=2, memory="2G", cwd=None, timeout=None, **popen):
    """Run `command` inside the lab kernel; returns the CompletedProcess.

    Without a terminal, stdin must not be left open to the caller: virtme-ng
    forwards it to the guest, and the guest command then waits on it."""
    if not os.isatty(0):
        popen.setdefault("stdin", subprocess.DEVNULL)
    env = dict(os.environ)
    # virtme-ng runs its helpers (virtme-run) from PATH: put the venv's first
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.run(vng_argv(command, kernel, cpus, memory, cwd), env=env,
                          timeout=timeout, **popen)
