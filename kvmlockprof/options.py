"""Options objects: a source's settings, declared once as a dataclass.

Each field is a knob(): its default, its range (checked when the object is made, so
the Python API and the command line refuse the same values), its command-line flags
and help. `click_options` turns the fields into click options and `from_kwargs` takes
them back: a new setting is one field here plus its use in the C, where it reaches
the BPF either as a load-time value (`bpf=`: a field of the program's settings map,
read at run time, the same program for every value) or, where it sizes a map or
decides whether a map or program exists, as a `-D` define (`define=`).
"""
import dataclasses


class OptionError(ValueError):
    pass


def knob(default, *flags, help="", min=None, max=None, bpf=None, define=None,
         is_flag=False, multiple=False, csv=False, metavar=None, choices=None,
         show_default=True, dest=None):
    """A dataclass field with its command-line form. flags: click's ("-M",
    "--map-nr-entries"), none for a setting the command line does not take; dest: the
    command function's parameter when the field's name is not; csv: "A,B" -> a tuple."""
    meta = dict(flags=flags, help=help, min=min, max=max, bpf=bpf, define=define,
                is_flag=is_flag, multiple=multiple, csv=csv, metavar=metavar,
                choices=choices, show_default=show_default, dest=dest)
    if isinstance(default, (list, dict, set)):
        raise TypeError("a knob's default is immutable (a tuple)")
    return dataclasses.field(default=default, metadata={"knob": meta})


def knobs(cls):
    """(field, its knob metadata) of an options class, in declaration order."""
    return [(f, f.metadata["knob"]) for f in dataclasses.fields(cls) if "knob" in f.metadata]


def check(obj):
    """Refuse values out of their knobs' ranges (__post_init__ of an options class)."""
    for f, k in knobs(type(obj)):
        v = getattr(obj, f.name)
        if v is None or isinstance(v, (tuple, bool)):
            continue
        name = k["flags"][-1] if k["flags"] else f.name
        if k["min"] is not None and v < k["min"] or k["max"] is not None and v > k["max"]:
            hi = "" if k["max"] is None else f"..{k['max']}"
            raise OptionError(f"{name} must be {k['min']}{hi or ' or more'}, not {v}")
        if k["choices"] and v not in k["choices"]:
            raise OptionError(f"{name} must be one of {', '.join(k['choices'])}, not {v}")


def _csv(ctx, param, value):
    return tuple(x.strip() for x in value.split(",") if x.strip()) if value else ()


def click_options(cls, only=None, helps=None):
    """A decorator adding cls's knobs (those with flags; `only`: these fields) as click
    options, in declaration order; helps: {field: help} where a command says more."""
    import click

    def option(f, k):
        kw = dict(help=(helps or {}).get(f.name, k["help"]), metavar=k["metavar"])
        if k["is_flag"]:
            kw.update(is_flag=True)
        elif k["csv"]:
            kw.update(callback=_csv, default=None)
        elif k["multiple"]:
            kw.update(multiple=True)
        else:
            kw.update(default=f.default, show_default=k["show_default"] and f.default
                      is not None)
            if k["choices"]:
                kw["type"] = click.Choice(k["choices"])
            elif k["min"] is not None or k["max"] is not None:
                kw["type"] = click.IntRange(k["min"], k["max"])
        return click.option(*k["flags"], k["dest"] or f.name, **kw)

    chosen = [option(f, k) for f, k in knobs(cls)
              if k["flags"] and (only is None or f.name in only)]

    def add(fn):
        for opt in reversed(chosen):
            fn = opt(fn)
        return fn
    return add


def from_kwargs(cls, kwargs, **fixed):
    """cls from a command's parameters (those its knobs own are taken out of kwargs;
    those absent keep their defaults), with `fixed` fields set."""
    values = {}
    for f, k in knobs(cls):
        dest = k["dest"] or f.name
        if dest in kwargs:
            v = kwargs.pop(dest)
            if v is not None and v != ():
                values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values, **fixed)


def bpf_values(obj):
    """{settings-map field: value} of the knobs read by the BPF at run time."""
    return {k["bpf"]: int(getattr(obj, f.name)) for f, k in knobs(type(obj)) if k["bpf"]}


def defines(obj):
    """{-D name: value} of the knobs the C is built with."""
    return {k["define"]: getattr(obj, f.name) for f, k in knobs(type(obj)) if k["define"]}
