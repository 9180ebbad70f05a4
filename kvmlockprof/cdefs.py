"""Constants the Python side takes from the BPF C, where they are stated once:
enums (counters, outcomes) and integer #defines, read from bpf/ with the subset of C
the project's headers use. bcc's view of the C gives layouts (table.Key/Leaf,
table.event()), not enumerators; this gives those."""
import ast
import functools
import operator
import re
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent / "bpf"

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_ENUM = re.compile(r"\benum\s+(\w+)\s*\{(.*?)\}", re.S)
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+([-+()<|x0-9a-fA-FuUlL \t]+)$", re.M)
_SUFFIX = re.compile(r"(?<=[0-9a-fA-F])[uUlL]+\b")
_OPS = {ast.LShift: operator.lshift, ast.BitOr: operator.or_, ast.Add: operator.add,
        ast.Sub: operator.sub, ast.USub: operator.neg}


def value(text):
    """An integer constant expression (literals with U/L suffixes, <<, |, +, -)."""
    def ev(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.operand))
        raise ValueError(text)
    return ev(ast.parse(_SUFFIX.sub("", text).strip(), mode="eval").body)


# (file, enum) every enum read so far: a test checks that each enum of bpf/ is read
READ = set()


class CDefsError(LookupError):
    pass


@functools.lru_cache(maxsize=None)
def _text(name):
    return _COMMENT.sub(" ", (BPF_DIR / name).read_text())


def enum(file, name):
    """{enumerator: value} of `enum name` in bpf/<file>, in declaration order."""
    for m in _ENUM.finditer(_text(file)):
        if m.group(1) != name:
            continue
        READ.add((file, name))
        out, nxt = {}, 0
        for item in filter(None, (s.strip() for s in m.group(2).split(","))):
            ident, _, expr = (p.strip() for p in item.partition("="))
            if expr:
                nxt = out[expr] if expr in out else value(expr)
            out[ident] = nxt
            nxt += 1
        return out
    raise CDefsError(f"bpf/{file} has no enum {name}")


def define(file, name):
    """The integer value of `#define name` in bpf/<file>."""
    for m in _DEFINE.finditer(_text(file)):
        if m.group(1) == name:
            return value(m.group(2))
    raise CDefsError(f"bpf/{file} has no integer #define {name}")


@functools.lru_cache(maxsize=None)      # read at every flush (FunctionProbes.counters)
def counters(file, name):
    """The counter names of `enum name`, in order: each enumerator's part after
    `_C_`, lower-cased (KVMLP_C_LOST_AGG_FULL -> lost_agg_full), the trailing
    count (..._NR_...) left out."""
    out = []
    for ident in enum(file, name):
        head, sep, tail = ident.partition("_C_")
        if not sep:
            if "_NR_" in ident:
                continue
            raise CDefsError(f"bpf/{file}: enum {name}'s {ident} is not named PREFIX_C_NAME")
        out.append(tail.lower())
    return tuple(out)


def labels(file, name, names):
    """{value: label} for `enum name`, from {enumerator: label}: every enumerator
    labelled, no label for an enumerator the C lacks."""
    values = enum(file, name)
    if set(values) != set(names):
        raise CDefsError(f"bpf/{file}: enum {name} and its labels disagree: "
                         f"unlabelled {sorted(set(values) - set(names))}, "
                         f"not in the C {sorted(set(names) - set(values))}")
    return {values[k]: v for k, v in names.items()}


_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", re.S)
_MEMBER = re.compile(r"^\s*(u64|s64|u32|s32|u16|s16|u8|s8|char)\s+(\w+)\s*(?:\[\s*(\w+)\s*\])?$")
_NUMPY = {"u64": "<u8", "s64": "<i8", "u32": "<u4", "s32": "<i4", "u16": "<u2", "s16": "<i2",
          "u8": "u1", "s8": "i1"}


def _size(file, text):
    """An array size: a literal, or a #define of bpf/<file> or a header it includes."""
    try:
        return value(text)
    except (ValueError, SyntaxError):
        pass
    for f in [file] + re.findall(r'#include\s+"([\w.]+)"', (BPF_DIR / file).read_text()):
        try:
            return define(f, text)
        except CDefsError:
            continue
    raise CDefsError(f"bpf/{file}: no integer #define {text}")


def struct_fields(file, name):
    """[(member, numpy type[, shape])] of `struct name` in bpf/<file>: the fixed-width
    integers and char arrays the shared headers use (char[N]: bytes S<N>), in order."""
    for m in _STRUCT.finditer(_text(file)):
        if m.group(1) != name:
            continue
        out = []
        for decl in filter(None, (d.strip() for d in m.group(2).split(";"))):
            mm = _MEMBER.match(decl)
            if not mm:
                raise CDefsError(f"bpf/{file}: struct {name}'s member {decl!r} is not "
                                 "a fixed-width integer or a char array")
            typ, member, n = mm.groups()
            if typ == "char":
                out.append((member, f"S{_size(file, n) if n else 1}"))
            elif n:
                out.append((member, _NUMPY[typ], (_size(file, n),)))
            else:
                out.append((member, _NUMPY[typ]))
        return out
    raise CDefsError(f"bpf/{file} has no struct {name}")
