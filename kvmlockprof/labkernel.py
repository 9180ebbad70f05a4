"""Lab kernels built from Debian's linux-source-6.12: one with lockdep
(CONFIG_PROVE_LOCKING), the authority lockorder is held against, and one with the
same source and a production-like config (no lock debugging). Small configs: x86's
defconfig, virtme-ng's own fragment for booting under it (its configkernel), and what
the lab needs (KVM with Xen, BTF, kprobes, fentry, modules for the lock zoo).
Both carry labpatches/*.patch: the seeds' bugs put back, each off until a bit of
kvm.kvmlp_seeds turns it on (so with 0 the kernel runs the code as released).
Built once into /var/cache/kvmlockprof/kernels/<release>, keyed by the source, the
config and the compiler; a change of the patches rebuilds only what they touch. Its
modules dir is linked from /lib/modules so that bcc and virtme-ng find it as they
find Debian's.
Usage: python -m kvmlockprof.labkernel [lockdep|prod ...] [--force]"""
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

CACHE = "/var/cache/kvmlockprof/kernels"
SOURCE_TARBALL = "/usr/src/linux-source-6.12.tar.xz"
PATCHES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "labpatches")
# Both flavours: the lab's needs, and a distro host's locking (out-of-line unlocks,
# as Debian's PREEMPT_DYNAMIC kernel has them; KALLSYMS_ALL as distros have it).
COMMON = """
CONFIG_LOCALVERSION_AUTO=n
CONFIG_MODULES=y
CONFIG_MODULE_UNLOAD=y
CONFIG_MODULE_SIG=n
CONFIG_KVM=y
CONFIG_KVM_INTEL=y
CONFIG_KVM_AMD=y
CONFIG_KVM_XEN=y
CONFIG_PREEMPT_VOLUNTARY=y
CONFIG_PREEMPT_DYNAMIC=y
CONFIG_KALLSYMS=y
CONFIG_KALLSYMS_ALL=y
CONFIG_DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT=y
CONFIG_DEBUG_INFO_REDUCED=n
CONFIG_DEBUG_INFO_SPLIT=n
CONFIG_DEBUG_INFO_BTF=y
CONFIG_DEBUG_INFO_BTF_MODULES=y
CONFIG_IKCONFIG=y
CONFIG_IKCONFIG_PROC=y
CONFIG_KPROBES=y
CONFIG_KPROBE_EVENTS=y
CONFIG_FUNCTION_TRACER=y
CONFIG_DYNAMIC_FTRACE=y
CONFIG_BPF_SYSCALL=y
CONFIG_BPF_JIT=y
CONFIG_BPF_EVENTS=y
CONFIG_DEBUG_FS=y
CONFIG_SYSTEM_TRUSTED_KEYRING=n
"""
FLAVOURS = {
    "lockdep": """
CONFIG_LOCALVERSION="-kvmlp-lockdep"
CONFIG_PROVE_LOCKING=y
CONFIG_DEBUG_ATOMIC_SLEEP=y
""",
    "prod": """
CONFIG_LOCALVERSION="-kvmlp-prod"
CONFIG_PROVE_LOCKING=n
CONFIG_DEBUG_LOCK_ALLOC=n
CONFIG_DEBUG_SPINLOCK=n
CONFIG_DEBUG_MUTEXES=n
CONFIG_DEBUG_RWSEMS=n
""",
}
# What must hold after olddefconfig (a dependency Kconfig dropped fails the build
# before 20 minutes are spent on a kernel the lab cannot use).
REQUIRED = ("CONFIG_KVM_XEN=y", "CONFIG_KPROBES=y", "CONFIG_DEBUG_INFO_BTF=y",
            "CONFIG_UNINLINE_SPIN_UNLOCK=y", "CONFIG_NET_9P_VIRTIO=y", "CONFIG_MODULES=y",
            "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS=y")
FLAVOUR_REQUIRED = {"lockdep": ("CONFIG_PROVE_LOCKING=y", "CONFIG_LOCKDEP=y"),
                    "prod": ("# CONFIG_PROVE_LOCKING is not set",)}
# ... and what must not (lock debugging that some other option selected)
FLAVOUR_FORBIDDEN = {"lockdep": (), "prod": ("CONFIG_LOCKDEP=y", "CONFIG_DEBUG_LOCK_ALLOC=y",
                                              "CONFIG_DEBUG_SPINLOCK=y", "CONFIG_DEBUG_MUTEXES=y")}
BUILD_DEPS = ("gcc", "make", "bc", "bison", "flex", "pahole", "xz", "patch")


class KernelBuildError(RuntimeError):
    pass


def _virtme_fragment():
    """virtme-ng's own minimal config for booting under it (its configkernel)."""
    p = subprocess.run([sys.executable, "-m", "virtme.commands.configkernel", "--dry-run",
                        "--arch", "x86_64", "--defconfig"], capture_output=True, text=True)
    if p.returncode or "CONFIG_9P_FS" not in p.stdout:
        raise KernelBuildError("virtme-ng's configkernel gave no config: run `make lab` "
                               f"({p.stderr.strip()[-200:]})")
    return p.stdout


def _source_version():
    """The tarball's version, from the Debian package that installed it."""
    p = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "linux-source-6.12"],
                       capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def _compiler():
    return subprocess.run(["gcc", "--version"], capture_output=True,
                          text=True).stdout.splitlines()[0]


def config_text(flavour):
    return _virtme_fragment() + COMMON + FLAVOURS[flavour]


def cache_key(flavour):
    h = hashlib.sha256("\0".join([_source_version(), config_text(flavour),
                                  _compiler()]).encode()).hexdigest()[:12]
    return f"{flavour}-{h}"


def cache_dir(flavour):
    return os.path.join(CACHE, cache_key(flavour))


def _patches():
    """[(path, text)] of the lab's kernel patches, in order."""
    out = []
    for path in sorted(glob.glob(os.path.join(PATCHES, "*.patch"))):
        with open(path) as f:
            out.append((path, f.read()))
    return out


def patches_hash():
    return hashlib.sha256("\0".join(t for _, t in _patches()).encode()).hexdigest()[:12]


def _patched_files(text):
    return [line.split(None, 1)[1].split("\t")[0][2:] for line in text.splitlines()
            if line.startswith("+++ ")]


def _stamp(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def built(flavour):
    """The cached build's bzImage (built from the current patches), or None."""
    d = cache_dir(flavour)
    image = os.path.join(d, "build", "arch", "x86", "boot", "bzImage")
    return image if _stamp(os.path.join(d, ".built")) == patches_hash() and \
        os.path.exists(image) else None


def release(image):
    """The kernel release of a built bzImage (from its build tree)."""
    with open(os.path.join(os.path.dirname(image), "..", "..", "..", "include", "config",
                           "kernel.release")) as f:
        return f.read().strip()


def build_dir(image):
    return os.path.realpath(os.path.join(os.path.dirname(image), "..", "..", ".."))


def _source(log):
    """The unpacked source, shared by the flavours (builds go to O= dirs)."""
    if not os.path.exists(SOURCE_TARBALL):
        raise KernelBuildError(f"{SOURCE_TARBALL} is missing: run `make lab-lockdep` "
                               "(installs Debian's linux-source-6.12)")
    src = os.path.join(CACHE, f"src-{_source_version()}")
    tree = os.path.join(src, "linux-source-6.12")
    stamp = os.path.join(src, ".unpacked")
    if not os.path.exists(stamp):
        shutil.rmtree(src, ignore_errors=True)
        os.makedirs(src)
        print(f"unpacking {SOURCE_TARBALL} into {src}", file=log)
        subprocess.run(["tar", "-xf", SOURCE_TARBALL, "-C", src], check=True)
        open(stamp, "w").close()
    _patch(src, tree, log)
    return tree


def _patch(src, tree, log):
    """Put the tree's patched files back as released and apply the current patches,
    touching only those files (their objects alone are rebuilt)."""
    stamp = os.path.join(src, ".patched")
    try:
        with open(stamp) as f:
            was = json.load(f)
    except (OSError, ValueError):
        was = {"hash": None, "files": []}
    want = patches_hash()
    if was["hash"] == want:
        return
    patches = _patches()
    files = sorted(set(was["files"]) | {f for _, t in patches for f in _patched_files(t)})
    if os.path.exists(stamp):
        os.unlink(stamp)
    if files:
        subprocess.run(["tar", "-xf", SOURCE_TARBALL, "-C", src, "--touch",
                        *[f"linux-source-6.12/{f}" for f in files]], check=True)
    for path, text in patches:
        print(f"applying {os.path.basename(path)}", file=log)
        p = subprocess.run(["patch", "-p1", "-d", tree, "--no-backup-if-mismatch", "-s"],
                           input=text, capture_output=True, text=True)
        if p.returncode:
            raise KernelBuildError(f"{path} does not apply to {tree}: "
                                   f"{(p.stdout + p.stderr).strip()[-300:]}")
    with open(stamp, "w") as f:
        json.dump({"hash": want, "files": files}, f)


def _configure(src, out, flavour):
    frag = os.path.join(out, "kvmlockprof.config")
    with open(frag, "w") as f:
        f.write(config_text(flavour))
    make = ["make", "-C", src, f"O={out}", "-s"]
    subprocess.run(make + ["x86_64_defconfig"], check=True)
    subprocess.run([os.path.join(src, "scripts", "kconfig", "merge_config.sh"), "-m", "-O", out,
                    os.path.join(out, ".config"), frag], check=True, cwd=src,
                   stdout=subprocess.DEVNULL)
    subprocess.run(make + ["olddefconfig"], check=True)
    with open(os.path.join(out, ".config")) as f:
        have = set(f.read().splitlines())
    missing = [o for o in REQUIRED + FLAVOUR_REQUIRED[flavour] if o not in have]
    if missing:
        raise KernelBuildError(f"the {flavour} config lost {', '.join(missing)} "
                               f"(a Kconfig dependency): see {out}/.config")
    extra = [o for o in FLAVOUR_FORBIDDEN[flavour] if o in have]
    if extra:
        raise KernelBuildError(f"the {flavour} config has {', '.join(extra)} (selected by "
                               f"another option): see {out}/.config")


def build(flavour, force=False, log=sys.stderr, jobs=None):
    """Build (or reuse) the flavour's kernel; returns its bzImage."""
    if flavour not in FLAVOURS:
        raise KernelBuildError(f"unknown lab kernel {flavour!r}: one of {', '.join(FLAVOURS)}")
    if not force and built(flavour):
        return built(flavour)
    missing = [t for t in BUILD_DEPS if not shutil.which(t)]
    if missing:
        raise KernelBuildError(f"{', '.join(missing)} missing: run `make lab-lockdep`")
    src = _source(log)
    d = cache_dir(flavour)
    out = os.path.join(d, "build")
    if os.path.exists(os.path.join(d, ".built")):      # a build of older patches: make
        os.unlink(os.path.join(d, ".built"))            # redoes what they touched
    os.makedirs(out, exist_ok=True)
    _configure(src, out, flavour)
    jobs = jobs or os.cpu_count() or 1
    print(f"building the {flavour} lab kernel in {out} (-j{jobs}; ~20 min on 2 cores)",
          file=log)
    subprocess.run(["make", "-C", src, f"O={out}", "-s", f"-j{jobs}", "bzImage", "modules"],
                   check=True)
    mods = os.path.join(d, "modules")
    shutil.rmtree(mods, ignore_errors=True)
    subprocess.run(["make", "-C", src, f"O={out}", "-s", "modules_install",
                    f"INSTALL_MOD_PATH={mods}", "INSTALL_MOD_STRIP=1"], check=True)
    image = os.path.join(out, "arch", "x86", "boot", "bzImage")
    with open(os.path.join(d, ".built"), "w") as f:
        f.write(patches_hash())
    install_modules(image)
    return image


def install_modules(image):
    """/lib/modules/<release> -> the cache's modules, its build link -> the build tree:
    bcc's headers and virtme-ng's modules, found as for a packaged kernel."""
    rel = release(image)
    d = os.path.dirname(build_dir(image))
    target = os.path.join(d, "modules", "lib", "modules", rel)
    link = f"/lib/modules/{rel}"
    if os.path.islink(link) and os.readlink(link) == target:
        return link
    if os.path.lexists(link):
        if not os.path.islink(link):
            raise KernelBuildError(f"{link} exists and is not ours: remove it to use the "
                                   f"lab kernel {rel}")
        os.unlink(link)
    os.symlink(target, link)
    # bcc reads a split (O=) tree's generated headers from build, the rest from source
    for name, path in (("build", build_dir(image)), ("source", _source_of(image))):
        at = os.path.join(target, name)
        if os.path.lexists(at):
            os.unlink(at)
        os.symlink(path, at)
    return link


def _source_of(image):
    """The source tree an O= build was made from (its Makefile includes it)."""
    with open(os.path.join(build_dir(image), "Makefile")) as f:
        for line in f:
            if line.startswith("include ") and line.strip().endswith("/Makefile"):
                return os.path.dirname(line.split(None, 1)[1].strip())
    raise KernelBuildError(f"cannot tell the source tree of {build_dir(image)}")


def find(flavour):
    """The cached flavour's bzImage, linked in /lib/modules, or None."""
    image = built(flavour)
    if image:
        install_modules(image)
    return image


def main(argv):
    flavours = [a for a in argv if not a.startswith("-")] or list(FLAVOURS)
    try:
        for f in flavours:
            print(build(f, force="--force" in argv))
    except (KernelBuildError, subprocess.CalledProcessError, OSError) as e:
        print(f"kvmlockprof: cannot build the lab kernel: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
