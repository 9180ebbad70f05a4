"""Ingestion: events per second from the BPF ring buffer into numpy / Arrow on one core.

Real contention on a small machine tops out far below what the reader can take,
so the events here come from a generator: a BPF program on the getppid syscall
tracepoint that emits BURST records of the contention probe's own event struct
(bpf/contention.h) per call, for a process calling getppid() in a loop on another
CPU. That is faster than any reader: above the sustainable rate the ring fills,
and every record that could not be reserved is counted in the kernel. The check:
decoded + counted losses == records attempted, exactly.
"""
import argparse
import os
import subprocess
import sys
import time


from kvmlockprof.kernel import bpfload
from kvmlockprof.kernel.ringbuf import BatchRingBuffer
from kvmlockprof.recording.arrow import to_arrow

from results_io import RESULTS, save      # bench/ is on sys.path when run as a script

GENERATOR = r"""
#include "contention.h"
BPF_RINGBUF_OUTPUT(events, RB_PAGES);
BPF_ARRAY(stats, u64, 2);               /* 0: records attempted, 1: not reserved */
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    if ((bpf_get_current_pid_tgid() >> 32) != GEN_TGID)
        return 0;
    int k0 = 0, k1 = 1;
    u64 *tried = stats.lookup(&k0), *lost = stats.lookup(&k1);
    if (!tried || !lost)
        return 0;
    for (int i = 0; i < BURST; i++) {
        __sync_fetch_and_add(tried, 1);
        struct kvmlp_contention_event *e = events.ringbuf_reserve(sizeof(*e));
        if (!e) {
            __sync_fetch_and_add(lost, 1);
            continue;
        }
        e->ts_ns = bpf_ktime_get_ns();
        e->wait_ns = i;
        e->lock_addr = 0xffff888100000000ULL + i;
        e->tid = e->tgid = GEN_TGID;
        e->flags = 1;
        e->stack_id = -1;
        e->cpu = bpf_get_smp_processor_id();
        e->ret = 0;
        bpf_get_current_comm(e->comm, sizeof(e->comm));
        events.ringbuf_submit(e, (*tried % 4096) ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP);
    }
    return 0;
}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--ringbuf-mb", type=int, default=16)
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "ingest.json"))
    a = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    reader_cpu, gen_cpu = cpus[0], cpus[-1]
    os.sched_setaffinity(0, {reader_cpu})            # the reader: one core
    gen = subprocess.Popen(["taskset", "-c", str(gen_cpu), sys.executable, "-c",
                            "import os, sys\nsys.stdin.read(1)\nwhile True: os.getppid()"],
                           stdin=subprocess.PIPE)
    pages = a.ringbuf_mb * 256
    b = bpfload.compile_bpf(text=GENERATOR, defines={"RB_PAGES": pages, "BURST": a.burst,
                                                      "GEN_TGID": gen.pid})
    rb = BatchRingBuffer(b["events"].map_fd, pages * 4096, bpfload.event_dtype(b["events"]))
    decoded = to_arrow_s = 0
    consume_s = 0.0
    batches = []
    gen.stdin.write(b"g")
    gen.stdin.flush()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        rb.wait(0.01)
        c0 = time.perf_counter()
        arr = rb.consume()
        c1 = time.perf_counter()
        t = to_arrow(arr) if arr.size else None
        c2 = time.perf_counter()
        consume_s += c1 - c0
        to_arrow_s += c2 - c1
        decoded += arr.size
        if t is not None and len(batches) < 50:
            batches.append(t)
    elapsed = time.perf_counter() - t0
    gen.kill()
    gen.wait()
    time.sleep(0.2)
    while True:                                      # drain what is left
        arr = rb.consume()
        if not arr.size:
            break
        decoded += arr.size
    tried, lost = (int(b["stats"][b["stats"].Key(i)].value) for i in (0, 1))
    import pyarrow as pa
    df_s = time.perf_counter()
    frame = pa.concat_tables(batches).to_pandas()
    df_s = time.perf_counter() - df_s
    rb.close()
    b.cleanup()
    rate = decoded / elapsed
    res = {"seconds": elapsed, "records_attempted": tried, "records_lost_counted": lost,
           "records_decoded": decoded, "exact": decoded + lost == tried,
           "decoded_per_s_wall": rate,
           "decoded_per_s_consume_only": decoded / consume_s if consume_s else None,
           "decoded_per_s_consume_and_arrow": decoded / (consume_s + to_arrow_s),
           "to_pandas_rows_per_s": len(frame) / df_s if df_s else None}
    print(f"attempted {tried:,}  decoded {decoded:,}  lost (counted in kernel) {lost:,}  "
          f"decoded + lost == attempted: {res['exact']}")
    print(f"reader on one core: {rate:,.0f} events/s over {elapsed:.1f} s wall "
          f"(ring -> numpy {res['decoded_per_s_consume_only']:,.0f}/s, ring -> numpy -> "
          f"Arrow {res['decoded_per_s_consume_and_arrow']:,.0f}/s while busy; "
          f"Arrow -> pandas {res['to_pandas_rows_per_s']:,.0f} rows/s)")
    print(f"target >= 1,000,000 events/s decoded: {'met' if rate >= 1e6 else 'NOT met'}")
    save(res, a.output)
    if not res["exact"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
