"""Apt source for Debian's bookworm-backports, made from the Debian source this
machine already uses (same archive, same signing key), for the Xen-capable lab
kernel. Usage: python -m kvmlockprof.backports [--write]"""
import glob
import os
import sys

TARGET = "/etc/apt/sources.list.d/kvmlockprof-backports.sources"


def _stanzas(text):
    return [dict(line.split(":", 1) for line in block.splitlines()
                 if ":" in line and not line.startswith("#"))
            for block in text.split("\n\n")]


def debian_main_source():
    """(URI, Signed-By or None) of the machine's bookworm main archive."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for st in _stanzas(open(path).read()):
            st = {k.strip(): v.strip() for k, v in st.items()}
            if "bookworm" in st.get("Suites", "").split() and st.get("URIs"):
                return st["URIs"].split()[0], st.get("Signed-By")
    if os.path.exists("/etc/apt/sources.list"):
        for line in open("/etc/apt/sources.list"):
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm":
                return parts[1], None
    return None, None


def source_text():
    uri, key = debian_main_source()
    if not uri:
        raise SystemExit("no Debian bookworm source found in /etc/apt: add bookworm-backports "
                         "by hand")
    lines = ["Types: deb", f"URIs: {uri}", "Suites: bookworm-backports", "Components: main"]
    if key:
        lines.append(f"Signed-By: {key}")
    return "\n".join(lines) + "\n"


def main(argv):
    text = source_text()
    if "--write" not in argv:
        sys.stdout.write(text)
        return 0
    if os.path.exists(TARGET) and open(TARGET).read() == text:
        return 0                        # idempotent: nothing written, nothing to update
    with open(TARGET + ".tmp", "w") as f:
        f.write(text)
    os.replace(TARGET + ".tmp", TARGET)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
