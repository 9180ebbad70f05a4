/* What every probe's maps share: none grows with the number of CPUs.
 *
 * Aggregates: one entry per key in a plain hash, shared by all CPUs and
 * updated with atomics. A per-CPU hash pins entries x value x possible CPUs
 * (1.7 GB for 16384 contention entries at 192 CPUs) and every read copies all
 * of it; a shared entry costs a locked add per field, on a cache line the
 * waiters of that lock already share. */
#ifndef KVMLP_KMAPS_H
#define KVMLP_KMAPS_H

/* log2(ns) buckets, as bcc's bpf_log2l() numbers them (floor(log2 ns) + 1):
 * slot s >= 1 holds [2^(s-1), 2^s) ns, slot 1 also 0 ns, slot 0 nothing.
 * kvmlockprof.analysis.hist_bounds() is the one reader of this rule; 64
 * slots make the index a mask. */
#define KVMLP_HIST_SLOTS 64

static __always_inline u32 kvmlp_slot(u64 ns)
{
	/* A mask, not a compare: older verifiers (6.1) lose a compared bound when
	 * the compiler indexes with another copy of the register. */
	return bpf_log2l(ns) & (KVMLP_HIST_SLOTS - 1);
}

#define KVMLP_THREAD_SIZE 16384         /* x86-64 and arm64 without KASAN */

static __always_inline void kvmlp_add(u64 *p, u64 v)
{
	__sync_fetch_and_add(p, v);
}

/* *p = max(*p, v), or (min) the smallest non-zero: a compare-and-swap retried
 * while another CPU moves *p, a few times (a lost race costs at most one
 * extreme among waits that ended in the same instant). */
#define KVMLP_CAS_TRIES 4
static __always_inline void kvmlp_max(u64 *p, u64 v)
{
	u64 cur = *p;
#pragma unroll
	for (int i = 0; i < KVMLP_CAS_TRIES && v > cur; i++) {
		u64 seen = __sync_val_compare_and_swap(p, cur, v);
		if (seen == cur)
			break;
		cur = seen;
	}
}

static __always_inline void kvmlp_min_nonzero(u64 *p, u64 v)
{
	u64 cur = *p;
#pragma unroll
	for (int i = 0; i < KVMLP_CAS_TRIES && (cur == 0 || v < cur); i++) {
		u64 seen = __sync_val_compare_and_swap(p, cur, v);
		if (seen == cur)
			break;
		cur = seen;
	}
}

/* Kernel stacks, KVMLP_STACK_DEPTH frames from the innermost (set by the loader;
 * bcc's BPF_STACK_TRACE keeps 127, 1 KB an entry): deeper stacks lose their
 * outermost frames, never the caller of the lock. */
struct kvmlp_stack {
	u64 ip[KVMLP_STACK_DEPTH];
};
#define KVMLP_STACK_MAP(name, entries) \
	BPF_TABLE("stacktrace", int, struct kvmlp_stack, name, roundup_pow_of_two(entries))
/* A stack map's bucket (the hash of a stack's frames) keeps one stack: where another
 * holds it the kernel refuses the walk (-EEXIST), and the same walk less its innermost
 * frame (the probed function's or the BPF program's, never a lock's caller: the
 * readers skip it) hashes elsewhere: get_stackid(ctx, KVMLP_SKIP_ONE) once more. */
#define KVMLP_EEXIST 17
#define KVMLP_SKIP_ONE 1        /* BPF_F_SKIP_FIELD_MASK's count of frames */

#endif
