/* lock:contention_begin/end -> per-thread pairing -> in-kernel aggregates
 * and a sample stream.  Build-time defines (set by the loader):
 *   KLP_FILTER_TGID   1: only processes in tgid_filter count
 *   KLP_FOLLOW_FORK   1: children of filtered processes join the filter
 *   KLP_SAMPLE_EVERY  stream every Nth wait (0: aggregates only)
 *   KLP_PENDING_ENTRIES, KLP_AGG_ENTRIES, KLP_STACK_ENTRIES, KLP_RINGBUF_PAGES
 *   KLP_WAKEUP_EVERY  wake the reader early every N samples on a CPU
 *   KLP_STACK_EVERY   walk the kernel stack of one wait in N per CPU
 *   KLP_STACK_BUDGET  at most this many stack walks per second per CPU (0: no cap)
 *   KLP_PENDING_TASK  1: a wait in progress is kept in task-local storage (5.12+);
 *                     0: in a hash keyed by thread and lock (any kernel, slower)
 */
#include "contention.h"

#if KLP_PENDING_TASK
/* The waits in progress of a task, by lock: a mutex emits two begins (spin,
 * then sleep) before its end, and the task can contend on other locks inside
 * a wait (the mutex's wait_lock; interrupts and softirqs taken while a
 * paravirt spinlock waiter halts), so several slots: 5 waits at once were
 * seen here under the churn storm. Task storage costs ~40 ns a lookup here,
 * a hash ~200 ns an operation, and it needs no sizing. */
#define KLP_NEST 8
struct pending_slots {
	u64 lock[KLP_NEST];     /* 0: free */
	u64 ts_ns[KLP_NEST];
	u32 flags[KLP_NEST];
};
BPF_TASK_STORAGE(pending, struct pending_slots);
#else
/* Keyed by thread and lock, for the same reasons. */
struct pending_key {
	u32 tid;
	u32 cpu;                /* only set for tid 0: each CPU's idle task is tid 0 */
	u64 lock_addr;
};

struct pending_val {
	u64 ts_ns;
	u32 flags;
	u32 pad;
};

BPF_HASH(pending, struct pending_key, struct pending_val, KLP_PENDING_ENTRIES);
#endif
BPF_PERCPU_HASH(agg, struct klp_agg_key, struct klp_agg_val, KLP_AGG_ENTRIES);
BPF_STACK_TRACE(stacks, KLP_STACK_ENTRIES);
BPF_PERCPU_ARRAY(counters, u64, KLP_NR_COUNTERS);
BPF_RINGBUF_OUTPUT(events, KLP_RINGBUF_PAGES);
#if KLP_FILTER_TGID
BPF_HASH(tgid_filter, u32, u8, 4096);
#endif
#if KLP_SAMPLE_EVERY > 1
BPF_PERCPU_ARRAY(sample_tick, u64, 1);
#endif
#if KLP_STACK_EVERY > 1
BPF_PERCPU_ARRAY(stack_tick, u64, 1);
#endif
#if KLP_STACK_BUDGET
/* Walks spent in the current window of this CPU. A window is ~10 ms (fewer
 * than 100 walks/s: one walk, in a window of 1/budget s), and its length is
 * set from the whole walks it allows, so no budget is exceeded. */
struct stack_window {
	u64 window;
	u64 walks;
};
BPF_PERCPU_ARRAY(stack_budget, struct stack_window, 1);
#define KLP_WALKS_PER_WINDOW (KLP_STACK_BUDGET >= 100 ? KLP_STACK_BUDGET / 100 : 1)
#define KLP_WINDOW_NS (1000000000ULL * KLP_WALKS_PER_WINDOW / KLP_STACK_BUDGET)
#endif
/* A zeroed value to create aggregates from: too big for the 512-byte stack. */
BPF_PERCPU_ARRAY(agg_zero, struct klp_agg_val, 1);

static __always_inline void count(int idx)
{
	u64 *v = counters.lookup(&idx);
	if (v)
		(*v)++;         /* per-CPU: no atomics needed */
}

static __always_inline int wanted(u32 tgid)
{
#if KLP_FILTER_TGID
	return tgid_filter.lookup(&tgid) != NULL;
#else
	return 1;
#endif
}

#if KLP_PENDING_TASK
static __always_inline void begin_wait(u32 tid, u64 lock, u32 flags)
{
	struct pending_slots *p = pending.task_storage_get(bpf_get_current_task_btf(), 0,
							   BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!p) {
		count(KLP_C_PENDING_FULL);
		return;
	}
	int free = KLP_NEST;
#pragma unroll
	for (int i = 0; i < KLP_NEST; i++) {
		if (p->lock[i] == lock) {
			/* Second begin of one wait (mutex: spin, then sleep): keep
			 * the first timestamp, take the flags of how it finally waits. */
			p->flags[i] = flags;
			return;
		}
		if (free == KLP_NEST && !p->lock[i])
			free = i;
	}
	if (free >= KLP_NEST) {
		count(KLP_C_PENDING_FULL);
		return;
	}
	p->lock[free] = lock;
	p->ts_ns[free] = bpf_ktime_get_ns();
	p->flags[free] = flags;
}

/* The wait on `lock` that ends now: 1 and its start and flags, or 0. */
static __always_inline int end_wait(u32 tid, u64 lock, u64 *ts_ns, u32 *flags)
{
	struct pending_slots *p = pending.task_storage_get(bpf_get_current_task_btf(), 0, 0);
	if (!p)
		return 0;
#pragma unroll
	for (int i = 0; i < KLP_NEST; i++) {
		if (p->lock[i] == lock) {
			*ts_ns = p->ts_ns[i];
			*flags = p->flags[i];
			p->lock[i] = 0;
			return 1;
		}
	}
	return 0;
}
#else
static __always_inline struct pending_key key_of(u32 tid, u64 lock)
{
	struct pending_key k = {};
	k.tid = tid;
	k.cpu = tid ? 0 : bpf_get_smp_processor_id();
	k.lock_addr = lock;
	return k;
}

static __always_inline void begin_wait(u32 tid, u64 lock, u32 flags)
{
	struct pending_key k = key_of(tid, lock);
	struct pending_val *p = pending.lookup(&k);
	if (p) {
		p->flags = flags;       /* second begin of one wait, as above */
		return;
	}
	struct pending_val v = {};
	v.ts_ns = bpf_ktime_get_ns();
	v.flags = flags;
	if (pending.update(&k, &v))
		count(KLP_C_PENDING_FULL);
}

static __always_inline int end_wait(u32 tid, u64 lock, u64 *ts_ns, u32 *flags)
{
	struct pending_key k = key_of(tid, lock);
	struct pending_val *p = pending.lookup(&k);
	if (!p)
		return 0;
	*ts_ns = p->ts_ns;
	*flags = p->flags;
	pending.delete(&k);
	return 1;
}
#endif

TRACEPOINT_PROBE(lock, contention_begin)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!wanted(id >> 32))
		return 0;
	count(KLP_C_BEGIN);
	begin_wait((u32)id, (u64)args->lock_addr, args->flags);
	return 0;
}

TRACEPOINT_PROBE(lock, contention_end)
{
	u64 now = bpf_ktime_get_ns();
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	if (!wanted(tgid))
		return 0;
	count(KLP_C_END);
	u64 lock = (u64)args->lock_addr;
	u64 start = 0;
	u32 flags = 0;
	if (!end_wait((u32)id, lock, &start, &flags)) {
		count(KLP_C_END_NO_BEGIN);
		return 0;
	}
	u64 wait = now - start;

	/* The stack walk is most of this program's cost (~3 us on a nested guest,
	 * with the lock held): --stack-every N walks for one wait in N per CPU,
	 * and the budget caps walks per CPU-second, so a contention storm costs a
	 * bounded amount; the waits without a stack count under KLP_NO_STACK. */
	int zero_idx = 0;
	int stack_id = KLP_NO_STACK;
	int walk = 1;
#if KLP_STACK_EVERY > 1
	u64 *st = stack_tick.lookup(&zero_idx);
	walk = st && (*st)++ % KLP_STACK_EVERY == 0;
#endif
#if KLP_STACK_BUDGET
	struct stack_window *sw = stack_budget.lookup(&zero_idx);
	if (walk && sw) {
		u64 window = now / KLP_WINDOW_NS;
		if (sw->window != window) {
			sw->window = window;
			sw->walks = 0;
		}
		walk = sw->walks < KLP_WALKS_PER_WINDOW;
		sw->walks += walk;
	}
#endif
	if (walk) {
		stack_id = stacks.get_stackid(args, 0);
		if (stack_id < 0)
			count(KLP_C_STACK_FAIL);
	}

	struct klp_agg_key ak = {};
	ak.lock_addr = lock;
	ak.tgid = tgid;
	ak.flags = flags;
	ak.stack_id = stack_id;
	struct klp_agg_val *zero = agg_zero.lookup(&zero_idx);
	struct klp_agg_val *a = zero ? agg.lookup_or_try_init(&ak, zero) : NULL;
	if (a) {
		a->count++;
		a->total_ns += wait;
		if (wait > a->max_ns)
			a->max_ns = wait;
		if (a->min_ns == 0 || wait < a->min_ns)
			a->min_ns = wait;
		/* A mask, not a compare: older verifiers lose a compared bound when
		 * the compiler indexes with another copy of the register. */
		a->hist[bpf_log2l(wait) & (KLP_HIST_SLOTS - 1)]++;
	} else {
		count(KLP_C_AGG_FULL);
	}

#if KLP_SAMPLE_EVERY == 0
	return 0;
#else
#if KLP_SAMPLE_EVERY > 1
	u64 *tick = sample_tick.lookup(&zero_idx);
	if (!tick || (*tick)++ % KLP_SAMPLE_EVERY)
		return 0;
#endif
	struct klp_contention_event *e = events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		count(KLP_C_RINGBUF_FULL);
		return 0;
	}
	e->ts_ns = now;
	e->wait_ns = wait;
	e->lock_addr = lock;
	e->tid = (u32)id;
	e->tgid = tgid;
	e->flags = flags;
	e->stack_id = stack_id;
	e->cpu = bpf_get_smp_processor_id();
	e->ret = args->ret;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	/* The reader polls on a timer; a wakeup per sample would cost more than
	 * the sample.  Every KLP_WAKEUP_EVERY samples on a CPU wake it early. */
	int idx = KLP_C_SAMPLED;
	u64 *n = counters.lookup(&idx);
	u64 wake = BPF_RB_NO_WAKEUP;
	if (n && ++(*n) % KLP_WAKEUP_EVERY == 0)
		wake = BPF_RB_FORCE_WAKEUP;
	events.ringbuf_submit(e, wake);
	return 0;
#endif
}

#if KLP_FILTER_TGID && KLP_FOLLOW_FORK
TRACEPOINT_PROBE(sched, sched_process_fork)
{
	u32 parent = bpf_get_current_pid_tgid() >> 32;
	if (!tgid_filter.lookup(&parent))
		return 0;
	u32 child = args->child_pid;    /* a new process's tgid; harmless for a thread */
	u8 one = 1;
	tgid_filter.update(&child, &one);
	return 0;
}
#endif
