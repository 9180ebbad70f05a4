"""The kept compiles' key and directory (kernel/bpfcache.py; what is kept is checked
against the kernel in test_live_bpfcache.py)."""
import os

from kvmlockprof.kernel import bpfcache
from kvmlockprof.kernel.headers import Headers


def test_the_key_changes_with_everything_that_changes_the_program(tmp_path, monkeypatch):
    (tmp_path / "a.h").write_text("#define X 1\n")
    h = Headers("fallback", "/usr/src/linux-headers-6.1.0-x", "/usr/src/common", "6.1.0-x")

    def key(text="int f;", cflags=("-DA=1",), headers=h):
        return bpfcache.key(text, cflags, headers, str(tmp_path))
    base = key()
    assert key() == base
    assert key(text="int g;") != base
    assert key(cflags=("-DA=2",)) != base
    assert key(headers=Headers("matching", "/lib/modules/x/build", "/lib/modules/x/build",
                               "6.18")) != base
    (tmp_path / "a.h").write_text("#define X 2\n")
    assert key() != base
    (tmp_path / "a.h").write_text("#define X 1\n")
    assert key() == base
    real = os.uname()
    monkeypatch.setattr(os, "uname", lambda: (*real[:3], "#2 SMP another build", *real[4:]))
    assert key() != base


def test_a_directory_others_may_write_is_not_used(tmp_path, monkeypatch):
    d = tmp_path / "bpf"
    monkeypatch.setattr(bpfcache, "CACHE_DIR", str(d))
    assert bpfcache._dir() == str(d)
    assert oct(d.stat().st_mode & 0o777) == oct(0o700)
    d.chmod(0o777)
    assert bpfcache._dir() is None
    assert bpfcache.load("0" * 64) is None


def test_only_the_newest_entries_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(bpfcache, "KEEP", 3)
    for i in range(5):
        p = tmp_path / f"{i}.json"
        p.write_text("{}")
        os.utime(p, (1000 + i, 1000 + i))
    bpfcache._prune(str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["2.json", "3.json", "4.json"]


def test_doctor_says_what_is_kept(tmp_path, monkeypatch):
    d = tmp_path / "bpf"
    monkeypatch.setattr(bpfcache, "CACHE_DIR", str(d))
    assert bpfcache.describe() == ("ok", f"0 kept in {d}: a run with the same C, settings, "
                                   "kernel and bcc loads its compile (no clang); a first run "
                                   "compiles (~1 s)")
    (d / "a.json").write_text("{}")
    assert bpfcache.describe()[1].startswith(f"1 kept in {d}")
    d.chmod(0o777)
    assert bpfcache.describe()[0] == "no"
    monkeypatch.setattr(bpfcache, "CACHE_DIR", "off")
    assert bpfcache.describe()[0] == "off"


def test_a_compile_that_cannot_be_kept_is_not_an_error(tmp_path, monkeypatch):
    """A full or read-only cache directory: save says no, the run goes on."""
    monkeypatch.setattr(bpfcache, "CACHE_DIR", str(tmp_path / "bpf"))
    monkeypatch.setattr(bpfcache, "_describe", lambda bpf, code_of: {"format": 1})

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bpfcache.tempfile, "mkstemp", full)
    assert bpfcache.save("0" * 64, None, None) is False
    monkeypatch.undo()
    monkeypatch.setattr(bpfcache, "CACHE_DIR", str(tmp_path / "bpf"))
    monkeypatch.setattr(bpfcache, "_describe", lambda bpf, code_of: {"format": 1})
    monkeypatch.setattr(bpfcache.json, "dump", full)
    assert bpfcache.save("0" * 64, None, None) is False
    assert list((tmp_path / "bpf").iterdir()) == []
