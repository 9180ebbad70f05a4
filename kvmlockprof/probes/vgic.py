"""vgic (arm64): vgic_put_irq's count and latency, LPI or not, whether the put
released the IRQ, and whether IRQs were off at the call (bpf/vgic.bpf.c)."""
import numpy as np

from kvmlockprof import cdefs
from kvmlockprof.catalog import FENTRY, KPROBE, Probe, Section, Target
from kvmlockprof.probes.common import stats

IRQS = cdefs.labels("vgic.bpf.c", "vgic_irqs", {
    "VGIC_IRQS_ON": "on", "VGIC_IRQS_OFF": "off", "VGIC_IRQS_UNKNOWN": "unknown"})
MIN_LPI = cdefs.define("vgic.bpf.c", "VGIC_MIN_LPI")
INTID_UNKNOWN = cdefs.define("vgic.bpf.c", "VGIC_INTID_UNKNOWN")


def puts(rec):
    """vgic_put_irq latency per VM, LPI or not, last reference or not, IRQs on or off."""
    df = rec.table("vgic")
    if df.empty:
        return df
    df = df.assign(lpi=(df["intid"] >= MIN_LPI) & (df["intid"] != INTID_UNKNOWN),
                   released=df["refcount"] == 1, irqs_off=df["irqs_off"].map(IRQS))
    return stats(df, ["tgid", "kvm", "lpi", "released", "irqs_off"], "lat_ns")


def _figure(rec):
    import plotly.express as px
    vg = puts(rec)
    if vg.empty:
        return None
    v = vg.assign(what=np.where(vg["lpi"], "LPI", "SGI/PPI/SPI") +
                  np.where(vg["released"], ", last ref", ""))
    return px.bar(v, x="what", y="count", color="irqs_off",
                  hover_data=["p50_ns", "p99_ns", "max_ns"])


def compare_values(rec):
    vg = rec.table("vgic")
    return {} if vg.empty else {("vgic_put_irq mean latency", "lower", "ns"):
                                float(vg["lat_ns"].mean())}


PROBE = Probe(
    name="vgic",
    fires="per vgic_put_irq (interrupt injection, LPIs)",
    summary="arm64 vgic_put_irq: count, latency, LPI or not, released or not",
    targets=(Target("VGIC_PUT", ("vgic_put_irq",), (FENTRY, KPROBE), ("kvm", "irq"),
                    {"vgic_put_irq": ("kvm", "irq")}, ret=True),),
    bpf="vgic.bpf.c",
    arch=("aarch64",),
    tables=("vgic",),
    columns={"vgic": {"tgid": "n", "kvm": "n", "intid": "n", "refcount": "n",
                      "irqs_off": "n", "lat_ns": "n"}},
    streams=(("vgic_events", "vgic"),),
    fields={"IRQ_INTID": ("vgic_irq", "intid"),
            "IRQ_REFCOUNT": ("vgic_irq", "refcount.refs.counter")},
    notes="6.10 moved LPI refcounting into the xarray; later kernels changed it again: "
          "`released` is read from the refcount at entry where BTF has it",
    sections=(Section("vgic", "vgic_put_irq", puts, _figure, hex=("kvm",)),),
    compare=compare_values,
)
