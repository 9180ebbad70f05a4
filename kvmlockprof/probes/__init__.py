"""The probes: each module is one probe, beside its bpf/<probe>.bpf.c, and declares
its catalog entry (PROBE) with everything that shows it; functions.py loads and
reads every function probe generically, common.py holds what their analyses share.
The catalog (kvmlockprof/catalog.py) registers BUILTIN: a probe module imports only
what a probe is (kvmlockprof/probe.py), never the catalog."""
from kvmlockprof.probes import (contention, gpc, lockorder, srcu, vgic, vms, xarray,
                                xen_evtchn)

# Catalog order: what `probes`, doctor and the report list first.
BUILTIN = tuple(m.PROBE for m in (contention, vms, xen_evtchn, gpc, srcu, xarray, vgic,
                                  lockorder))
