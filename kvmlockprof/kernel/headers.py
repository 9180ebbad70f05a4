"""Kernel headers for bcc: the running kernel's, or Debian's nearest as a fallback
(field offsets then come from BTF only), and doctor --fix's link to them."""
import glob
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from kvmlockprof.kernel.host import kernel_release


@dataclass
class Headers:
    """Where bcc finds kernel headers, and whether they match the kernel."""
    status: str                 # "matching", "fallback" or "missing"
    build: str = ""             # kbuild output dir (generated headers, .config)
    source: str = ""            # source dir (include/linux/...); == build if not split
    release: str = ""           # the release the headers are for
    env: dict = field(default_factory=dict)
    cflags: list = field(default_factory=list)

    def describe(self):
        if self.status == "matching":
            return f"matching ({self.build})"
        if self.status == "fallback":
            return (f"fallback: {self.release} headers for a {kernel_release()} kernel "
                    f"({self.build}); field offsets must come from BTF, not these headers")
        return "missing"


def _debian_source_dir(build):
    """Debian splits headers into linux-headers-X-<flavour> (build) and -common."""
    mk = Path(build, "Makefile")
    if mk.exists():
        m = re.search(r"include\s+(\S+)/Makefile", mk.read_text(errors="replace"))
        if m and Path(m.group(1), "include/linux/kconfig.h").exists():
            return m.group(1)
    return build


def _version_key(path):
    return [int(x) if x.isdigit() else x for x in re.split(r"[.-]", os.path.basename(path))]


def find_headers(release=None):
    release = release or kernel_release()
    build = f"/lib/modules/{release}/build"
    if os.path.isdir(build):
        source = f"/lib/modules/{release}/source"
        source = source if os.path.isdir(source) else _debian_source_dir(build)
        return Headers("matching", os.path.realpath(build), os.path.realpath(source), release)
    candidates = [d for d in glob.glob("/usr/src/linux-headers-*")
                  if os.path.exists(os.path.join(d, ".config"))]
    if not candidates:
        return Headers("missing")
    build = max(candidates, key=_version_key)
    source = _debian_source_dir(build)
    rel = os.path.basename(build)[len("linux-headers-"):]
    h = Headers("fallback", build, source, rel)
    # bcc takes one directory (BCC_KERNEL_SOURCE) and resolves its include paths
    # relative to it: point it at the source half and add the generated half.
    h.env = {"BCC_KERNEL_SOURCE": source}
    if source != build:
        arch = "x86" if platform.machine() == "x86_64" else \
               "arm64" if platform.machine() == "aarch64" else platform.machine()
        h.cflags = [f"-I{build}/arch/{arch}/include/generated",
                    f"-I{build}/arch/{arch}/include/generated/uapi",
                    f"-I{build}/include", f"-I{build}/include/generated/uapi"]
    return h


def link_fallback_headers(headers):
    """doctor --fix: make /lib/modules/$(uname -r)/build point at the fallback."""
    release = kernel_release()
    d = f"/lib/modules/{release}"
    os.makedirs(d, exist_ok=True)
    os.symlink(headers.build, f"{d}/build")
    if headers.source != headers.build:
        os.symlink(headers.source, f"{d}/source")
    return f"{d}/build -> {headers.build}"
