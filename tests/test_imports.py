"""kvmlockprof's import graph has no cycle: every import of a kvmlockprof module,
at module level or inside a function, read from the source (ast), none executed."""
import ast
import pathlib

import pytest

PKG = "kvmlockprof"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PKG


def modules():
    """{dotted name: path} of every module under kvmlockprof/ (packages by their
    __init__)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name, level, current, is_package):
    """A relative import's absolute module name (`from . import x` in current)."""
    if not level:
        return name
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _parents(name):
    """Importing a.b.c first runs a's and a.b's __init__: an import of each."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports(name, path, known):
    """The kvmlockprof modules `name` imports, anywhere in its body, each with the
    line that does: {module: line}."""
    out = {}
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, name, is_package)
            # `from pkg import mod` imports the module pkg.mod; `from mod import f`, mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        for t in targets:
            if t != PKG and not t.startswith(PKG + "."):
                continue
            for m in _parents(t) + [t]:
                # (a package the importer is in has begun before it: no edge back)
                if m in known and m != name and not name.startswith(m + "."):
                    out.setdefault(m, node.lineno)
    return out


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(g):
    """One cycle of g as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_graph_is_read():
    g = graph()
    assert len(g) > 40
    # an import at module level, one inside a function, a relative one would count
    assert "kvmlockprof.probe" in g["kvmlockprof.probes.vms"]
    assert "kvmlockprof.kernel.tracefs" in g["kvmlockprof.probes.contention"]
    # a submodule's import runs its package's __init__ first
    assert "kvmlockprof.analysis" in g["kvmlockprof.probes.contention"]


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1}}) is None


def test_relative_imports_resolve():
    assert _resolve("x", 1, "kvmlockprof.probes.gpc", False) == "kvmlockprof.probes.x"
    assert _resolve("", 2, "kvmlockprof.probes", True) == "kvmlockprof"


def test_no_import_cycle():
    g = graph()
    cycle = find_cycle(g)
    if cycle:
        steps = [f"{a} (line {g[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle: " + " -> ".join(cycle) + "\n  " + "\n  ".join(steps))


def test_the_live_commands_attach_before_numpy_pyarrow_or_pandas_is_imported():
    """record, top and the exporter compile and attach with what these modules import:
    numpy, pyarrow and pandas (0.35 s together) come at their first use, after the
    attach (kvmlockprof.lazy)."""
    import subprocess
    import sys
    code = ("import sys, kvmlockprof.cli, kvmlockprof.recording.recorder, "
            "kvmlockprof.views.top, kvmlockprof.views.exporter, kvmlockprof.probes.sources; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('numpy', 'pyarrow', 'pandas'))[:5])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out


def test_a_lazy_module_hands_over_the_module_itself():
    """After its first use, the modules that held the stand-in hold numpy itself."""
    import subprocess
    import sys
    code = ("import kvmlockprof.quantiles as q, kvmlockprof.lazy as lazy, numpy; "
            "q.np.float64; print(q.np is numpy, lazy.np is numpy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["True", "True"], out
