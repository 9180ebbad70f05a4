/* lock:contention_begin/end -> per-thread pairing -> in-kernel aggregates
 * and a sample stream.  Build-time defines (set by the loader):
 *   KVMLP_FILTER_TGID   1: only processes in tgid_filter count
 *   KVMLP_FOLLOW_FORK   1: children of filtered processes join the filter
 *   KVMLP_PENDING_ENTRIES, KVMLP_AGG_ENTRIES, KVMLP_STACK_ENTRIES, KVMLP_RINGBUF_PAGES
 *   KVMLP_WAKEUP_EVERY  wake the reader early every N samples on a CPU
 *   KVMLP_PENDING_TASK  1: a wait in progress is kept in task-local storage (5.12+);
 *                     0: in a hash keyed by thread and lock (any kernel, slower)
 *   KVMLP_FILTER_TID, _ADDR, _TYPE: 1: perf's --tid, -L (addresses), -Y in the kernel
 *   KVMLP_FILTER_CGROUPS  N > 0: only tasks under one of N cgroups (-G)
 *   KVMLP_VCPU_EXITS    1: attribute vCPU threads' waits to KVM_RUN windows and
 *                     (KVMLP_EXIT_TP 1: x86's kvm_exit fields, 2: arm64's) to exits
 *   KVMLP_OFF_TASK_PREEMPT, KVMLP_OFF_RQ_CPU, KVMLP_OFF_PCPU_PREEMPT, _PCPU_HOT,
 *   _PCPU_HOT_PREEMPT, _PCPU_RUNQUEUES: where preempt_count is (the task's, or this
 *                     CPU's: see interrupted()), which tells an interrupt's waits from
 *                     its task's; KVMLP_OFF_TASK_STACK: task_struct.stack, its fallback
 *   KVMLP_OFF_TASK_MM, KVMLP_OFF_MM_MMAP_LOCK: task_struct.mm, mm_struct.mmap_lock (-1:
 *                     mmap_lock waits stay unnamed); KVMLP_OFF_TASK_FLAGS, KVMLP_PF_KTHREAD
 *   KVMLP_OFF_TASK_CFS_RQ, KVMLP_OFF_CFS_RQ_RQ: task_struct.se.cfs_rq, cfs_rq.rq
 *                     (CONFIG_FAIR_GROUP_SCHED; -1: run queues stay unnamed)
 *   KVMLP_NR_CPUS     possible CPUs (run_queues)
 *   KVMLP_ID_KFUNC_GET_KMEM_CACHE: bpf_get_kmem_cache's BTF id (6.13+; -1: slab
 *                     objects stay unnamed), with KVMLP_OFF_KMEM_CACHE_NAME
 *   KVMLP_OWNERS      1: --lock-owner (lock_owners; KVMLP_OFF_MUTEX_OWNER, _RWSEM_OWNER,
 *                     _TASK_PID from BTF)
 * Defines only size maps or decide whether a map or program exists; the values
 * (the sampling, the stack walks' rate and budget) are set at load and read at run
 * time from `armed`: one program serves every setting.
 *
 * Raw tracepoints, not perf-attached ones: a BPF program on a tracepoint
 * through perf that returns 0 drops the event for every perf listener (perf
 * record, perf lock record), and any other return value costs the perf path's
 * record build; a raw tracepoint's program is one more probe beside theirs.
 */
#include "contention.h"
#include "kfunc.h"

#if KVMLP_PENDING_TASK
/* The waits in progress of a task, by lock: a mutex begins several times
 * before its end (see continues()), and the task can contend on other locks inside
 * a wait (the mutex's wait_lock; interrupts and softirqs taken while a
 * paravirt spinlock waiter halts), so several slots. Task storage is a few
 * times cheaper a lookup than a hash and needs no sizing (bench/README.md). */
#define KVMLP_NEST 8
struct pending_slots {
	u64 lock[KVMLP_NEST];     /* 0: free */
	u64 ts_ns[KVMLP_NEST];
	u32 flags[KVMLP_NEST];
	s32 stack_id[KVMLP_NEST];
	u32 epoch[KVMLP_NEST];    /* armed.epoch at its begin */
	u32 nested[KVMLP_NEST];   /* begun inside another wait of the task */
	u32 owner[KVMLP_NEST];    /* --lock-owner: the tid holding it at the begin (0: unknown) */
	u32 level[KVMLP_NEST];    /* an interrupt's: interrupted()'s level at the begin */
};
BPF_TASK_STORAGE(pending, struct pending_slots);
/* An interrupt's waits, per CPU: in the task's slots, an interrupt waiting on the
 * lock its task waits on would take the task's slot (and end its wait). */
BPF_PERCPU_ARRAY(irq_pending, struct pending_slots, 1);
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
	s32 stack_id;
	u32 epoch;
	u32 owner;              /* as pending_slots' */
};

/* LRU: waits left from an earlier attach age out rather than fill it. */
BPF_TABLE("lru_hash", struct pending_key, struct pending_val, pending, KVMLP_PENDING_ENTRIES);
#endif
BPF_HASH(agg, struct kvmlp_agg_key, struct kvmlp_agg_val, KVMLP_AGG_ENTRIES);
BPF_HASH(nested_waits, struct kvmlp_nested_key, struct kvmlp_nested_val, KVMLP_AGG_ENTRIES);
/* The aggregate keys (stack KVMLP_NO_STACK) that got a stack at their end: see
 * first_stack(). */
BPF_HASH(first_walked, struct kvmlp_agg_key, u8, KVMLP_AGG_ENTRIES);
KVMLP_STACK_MAP(stacks, KVMLP_STACK_ENTRIES);
BPF_PERCPU_ARRAY(counters, u64, KVMLP_NR_COUNTERS);
BPF_RINGBUF_OUTPUT(events, KVMLP_RINGBUF_PAGES);
#if KVMLP_FILTER_TGID
/* The processes followed, and (KVMLP_FOLLOW_FORK) the threads forked in them
 * while they live: a task leaves it when it exits. */
BPF_HASH(tgid_filter, u32, u8, KVMLP_FILTER_ENTRIES);
#endif
/* perf lock contention's filters beside the process's, set from user space
 * before arming: a wait they drop takes one lookup at its begin and one at its
 * end, never a slot, a stack walk or a ring buffer record (its begins counted:
 * KVMLP_C_FILTERED). */
#if KVMLP_FILTER_TID
BPF_HASH(tid_filter, u32, u8, KVMLP_FILTER_ENTRIES);
#endif
#if KVMLP_FILTER_ADDR
BPF_HASH(addr_filter, u64, u8, KVMLP_FILTER_ENTRIES);
#endif
#if KVMLP_FILTER_TYPE
/* By LCB_F_* flags: KVMLP_TYPE_END set if a wait of these final flags is kept,
 * KVMLP_TYPE_BEGIN if a begin of them starts (or continues) one: a mutex begins
 * as mutex-spin and may end as mutex, so -Y mutex-spin lets every mutex begin in
 * and decides at the end. */
BPF_ARRAY(type_filter, u8, KVMLP_TYPE_SLOTS);
#endif
#if KVMLP_FILTER_CGROUPS
BPF_CGROUP_ARRAY(cgroup_filter, KVMLP_FILTER_CGROUPS);
#endif
BPF_PERCPU_ARRAY(sample_tick, u64, 1);
BPF_PERCPU_ARRAY(stack_tick, u64, 1);
/* This CPU's stack budget: a walk spends armed.walk_ns of credit, which
 * accrues with time up to one window's walks (armed.window_ns, ~10 ms; set by
 * ContentionProbe.set_stack_budget, which says why). Which waits are walked is
 * drawn at random, each with the chance that lets about a window's walks
 * through at the previous window's rate of waits: the first waits of every
 * window would stand for all of them, and bursts would skew the callers.
 * Credit, not a count reset every window: a count lets the draws of a
 * window's start through and cuts those after it, leaning the walked waits to
 * the window's start (bench/README.md). */
struct stack_window {
	u64 window;             /* now / window_ns */
	u64 waits;              /* begun in this window */
	u64 chance;             /* walk if bpf_get_prandom_u32() <= chance */
	u64 credit_ns;          /* walks left, in walk_ns each */
	u64 last_ns;            /* when the credit was last brought up to date */
};
BPF_PERCPU_ARRAY(stack_budget, struct stack_window, 1);
/* Set from user space. `on` while both tracepoints are attached: bcc attaches
 * contention_begin first, and a begin whose wait ends before contention_end is
 * attached would stay in its task's slots (an end without its begin is only
 * counted). `epoch` goes up at every arming: a wait begun in an earlier one
 * (whose end came while detached) is stale, never paired. The stack budget:
 * one walk per `walk_ns` per CPU, and bursts of at most `walks` (window_ns 0:
 * no cap); values, not build-time constants, so that it can change between
 * attaches. sample_every: stream every Nth wait (0: aggregates only);
 * stack_every: walk the stack of one wait in N per CPU (with the budget). */
struct kvmlp_arm {
	u32 on;
	u32 epoch;
	u64 window_ns;
	u64 walks;
	u64 walk_ns;
	u64 sample_every;
	u64 stack_every;
	u32 finder_tid;         /* run_queue_of_cpu()'s thread while it runs */
	u32 pad;
};
BPF_ARRAY(armed, struct kvmlp_arm, 1);
/* Locks the waiter tells apart (enum kvmlp_lock_kind), by address: checked when an
 * aggregate key is made, so at most once per lock, process, type and stack; not
 * preallocated, and emptied by each read (ContentionProbe.lock_kinds): only what is
 * found and not read yet takes memory. */
BPF_F_TABLE("hash", u64, struct kvmlp_lock_kind_val, lock_kinds, KVMLP_AGG_ENTRIES,
	    BPF_F_NO_PREALLOC);
#if KVMLP_OWNERS
/* --lock-owner: per sleeping lock and the task that held it as a wait began, the
 * waits it caused and their time. */
BPF_F_TABLE("hash", struct kvmlp_owner_key, struct kvmlp_owner_val, lock_owners,
	    KVMLP_AGG_ENTRIES, BPF_F_NO_PREALLOC);
#endif
/* Each CPU's run queue (struct rq *), by CPU: filled by run_queue_of_cpu(). */
BPF_ARRAY(run_queues, u64, KVMLP_NR_CPUS);
/* A zeroed value to create aggregates from: too big for the 512-byte stack. */
BPF_ARRAY(agg_zero, struct kvmlp_agg_val, 1);

static __always_inline void count(int idx)
{
	u64 *v = counters.lookup(&idx);
	if (v)
		(*v)++;         /* per-CPU: no atomics needed */
}

/* Whether the current process is followed (-p, or a command and its children). */
static __always_inline int wanted_process(u32 tgid)
{
#if KVMLP_FILTER_TGID
	return tgid_filter.lookup(&tgid) != NULL;
#else
	return 1;
#endif
}

/* Whether the current thread and this lock pass --tid/-G/-L. */
static __always_inline int wanted(u64 id, u64 lock)
{
#if KVMLP_FILTER_TID
	u32 tid = (u32)id;
	if (!tid_filter.lookup(&tid))
		return 0;
#endif
#if KVMLP_FILTER_ADDR
	if (!addr_filter.lookup(&lock))
		return 0;
#endif
#if KVMLP_FILTER_CGROUPS
	int under = 0;
#pragma unroll
	for (int i = 0; i < KVMLP_FILTER_CGROUPS; i++)
		under |= cgroup_filter.check_current_task(i) == 1;
	if (!under)
		return 0;
#endif
	return 1;
}

/* Whether -Y keeps a wait of these flags (mask: KVMLP_TYPE_BEGIN or _END). */
static __always_inline int wanted_type(u32 flags, u8 mask)
{
#if KVMLP_FILTER_TYPE
	if (flags >= KVMLP_TYPE_SLOTS)
		return 0;               /* a type perf has no name for: no -Y matches it */
	u8 *t = type_filter.lookup(&flags);
	return t && (*t & mask);
#else
	return 1;
#endif
}

static __always_inline int get_stack(void *ctx)
{
	int stack_id = stacks.get_stackid(ctx, 0);
	if (stack_id == -KVMLP_EEXIST)
		stack_id = stacks.get_stackid(ctx, KVMLP_SKIP_ONE);
	if (stack_id < 0)
		count(KVMLP_C_STACK_FAILURES);
	return stack_id;
}

/* The kernel stack of a wait that begins now, or KVMLP_NO_STACK. A walk is most
 * of a wait's cost (bench/README.md), so it is done at contention_begin, where the
 * task is about to wait anyway: at contention_end the lock is held (and a
 * mutex's wait_lock, with interrupts off), so a walk there lengthens the
 * critical section and every waiter behind it. --stack-every N walks for one
 * wait in N per CPU, and the budget caps walks per CPU-second, so a contention
 * storm costs a bounded amount; the waits without a stack count under
 * KVMLP_NO_STACK. */
static __always_inline int walk_stack(void *ctx, u64 now, struct kvmlp_arm *arm)
{
	int zero_idx = 0;
	int walk = 1;
	u64 every = arm->stack_every;
	if (every > 1) {
		u64 *st = stack_tick.lookup(&zero_idx);
		walk = st && (*st)++ % every == 0;
	}
	u64 window_ns = arm->window_ns, walks = arm->walks;
	struct stack_window *sw = window_ns ? stack_budget.lookup(&zero_idx) : NULL;
	if (walk && sw) {
		u64 window = now / window_ns;
		if (sw->window != window) {
			u64 before = sw->window + 1 == window ? sw->waits : 0;
			sw->chance = before > walks ? walks * 0xffffffffULL / before : 0xffffffffULL;
			sw->window = window;
			sw->waits = 0;
		}
		sw->waits++;
		walk = bpf_get_prandom_u32() <= sw->chance;
		if (walk) {
			u64 credit = sw->credit_ns + (now - sw->last_ns);
			credit = credit < window_ns ? credit : window_ns;
			sw->last_ns = now;
			walk = credit >= arm->walk_ns;
			sw->credit_ns = walk ? credit - arm->walk_ns : credit;
		}
	}
	return walk ? get_stack(ctx) : KVMLP_NO_STACK;
}

/* The stack of a wait that ends now without one, its lock (per process and
 * flags) having had no unwalked wait on this CPU yet: under the budget a lock
 * that contends a few times amid a storm would most often keep no caller at
 * all (bench/README.md). One walk per such
 * aggregate key, ever (first_walked), outside the budget; it is done at the
 * end, inside this one critical section, because only there does the
 * aggregate lookup every wait makes anyway say that the key is new, so the
 * common path pays nothing more. */
static __always_inline s32 first_stack(void *ctx, struct kvmlp_agg_key *ak)
{
	u8 one = 1;
	if (first_walked.insert(ak, &one))
		return KVMLP_NO_STACK;    /* walked before, or the map is full */
	count(KVMLP_C_FIRST_WALKS);
	return get_stack(ctx);
}

/* --lock-owner: the thread holding a mutex, or a write-held rwsem, as a wait on it
 * begins (its owner word, less the flag bits; a reader-held rwsem has no owner to
 * tell: 0). Spin and rw locks keep no owner. */
static __always_inline u32 owner_of(u64 lock, u32 flags)
{
#if KVMLP_OWNERS
	long off = -1;
	if (flags & KVMLP_LCB_F_MUTEX)
		off = KVMLP_OFF_MUTEX_OWNER;
	else if (!(flags & (KVMLP_LCB_F_SPIN | KVMLP_LCB_F_RT | KVMLP_LCB_F_PERCPU)) &&
		 (flags & (KVMLP_LCB_F_READ | KVMLP_LCB_F_WRITE)))
		off = KVMLP_OFF_RWSEM_OWNER;
	if (off < 0 || KVMLP_OFF_TASK_PID < 0)
		return 0;
	u64 word = 0;
	bpf_probe_read_kernel(&word, sizeof(word), (void *)(lock + off));
	if (!(flags & KVMLP_LCB_F_MUTEX) && (word & 1))
		return 0;               /* RWSEM_READER_OWNED */
	u64 task = word & ~7ULL;
	u32 pid = 0;
	if (task)
		bpf_probe_read_kernel(&pid, sizeof(pid), (void *)(task + KVMLP_OFF_TASK_PID));
	return pid;
#else
	return 0;
#endif
}

/* Whether a begin on a lock this task has a wait on (of this epoch) continues
 * that wait. Only a mutex begins more than once a wait: spinning (MUTEX|SPIN),
 * going to sleep (MUTEX), and again both each time it wakes first in line and
 * spins. Any other repeat means the first wait's end was missed: a new wait
 * starts (begin_without_end), or its start would be taken for this wait's. */
static __always_inline int continues(u32 had, u32 flags)
{
	return (had & KVMLP_LCB_F_MUTEX) && (flags & KVMLP_LCB_F_MUTEX);
}


/* x86 keeps preempt_count per CPU (__preempt_count; pcpu_hot's in 6.2-6.14): its
 * address on this CPU, found once from the CPU's run queue (another per-CPU variable,
 * reached from the running task and checked by its cpu field) and the two variables'
 * distance in the per-CPU section (BTF). One entry: 8 bytes a CPU. */
BPF_PERCPU_ARRAY(preempt_at, u64, 1);
#if KVMLP_OFF_PCPU_PREEMPT >= 0
#define KVMLP_PCPU_PREEMPT KVMLP_OFF_PCPU_PREEMPT
#elif KVMLP_OFF_PCPU_HOT >= 0 && KVMLP_OFF_PCPU_HOT_PREEMPT >= 0
#define KVMLP_PCPU_PREEMPT (KVMLP_OFF_PCPU_HOT + KVMLP_OFF_PCPU_HOT_PREEMPT)
#else
#define KVMLP_PCPU_PREEMPT -1
#endif
#define KVMLP_IRQ_LEVEL_UNKNOWN 1       /* (below every preempt_count level bit) */

/* Whether this program runs in an interrupt (hardirq, softirq being served, NMI) as
 * the kernel's tracer tells it, and at what level (0: not; deeper, larger;
 * KVMLP_IRQ_LEVEL_UNKNOWN: one of unknown level): from preempt_count, the task's
 * (task_preempt >= 0: arm64) or this CPU's (x86); where neither is in reach, from our
 * own frame: off the task's stack is an interrupt, which misses those that came from
 * user space (x86 runs them on the task's stack). Offsets < 0: BTF lacks them. */
/* The running task's run queue (its CFS entity's cfs_rq->rq), 0 where unknown. */
static __always_inline u64 current_rq(int task_cfs_rq, int cfs_rq_rq)
{
	u64 cfs_rq = 0, rq = 0;
	bpf_probe_read_kernel(&cfs_rq, sizeof(cfs_rq),
			      (void *)(bpf_get_current_task() + task_cfs_rq));
	if (cfs_rq)
		bpf_probe_read_kernel(&rq, sizeof(rq), (void *)(cfs_rq + cfs_rq_rq));
	return rq;
}

static __always_inline int in_interrupt_by(int task_preempt, int task_cfs_rq, int cfs_rq_rq,
					   int rq_cpu, int pcpu_preempt, int pcpu_rq,
					   int task_stack)
{
	u64 task = bpf_get_current_task(), at = 0;
	u32 pc = 0;
	if (task_preempt >= 0) {
		at = task + task_preempt;
	} else if (task_cfs_rq >= 0 && cfs_rq_rq >= 0 && rq_cpu >= 0 && pcpu_preempt >= 0 &&
		   pcpu_rq >= 0) {
		int zero = 0;
		u64 *cached = preempt_at.lookup(&zero);
		if (cached && *cached) {
			at = *cached;
		} else if (cached) {
			u64 rq = current_rq(task_cfs_rq, cfs_rq_rq);
			u32 cpu = ~0U;
			if (rq)
				bpf_probe_read_kernel(&cpu, sizeof(cpu), (void *)(rq + rq_cpu));
			if (cpu == bpf_get_smp_processor_id())
				at = *cached = rq - pcpu_rq + pcpu_preempt;
		}
	}
	if (at && !bpf_probe_read_kernel(&pc, sizeof(pc), (void *)at))
		return pc & 0x00ff0100;         /* NMI_MASK | HARDIRQ_MASK | SOFTIRQ_OFFSET */
	if (task_stack < 0)
		return 0;
	u64 marker = 0, sp = 0, stack = 0;
	void *frame = &marker;
	volatile u64 spill = 0;
	/* the frame's address as a number: spilled, then read back as data */
	__builtin_memcpy((void *)&spill, &frame, sizeof(frame));
	bpf_probe_read_kernel(&sp, sizeof(sp), (void *)&spill);
	bpf_probe_read_kernel(&stack, sizeof(stack), (void *)(task + task_stack));
	return sp - stack >= KVMLP_THREAD_SIZE ? KVMLP_IRQ_LEVEL_UNKNOWN : 0;
}

static __always_inline int interrupted(void)
{
	return in_interrupt_by(KVMLP_OFF_TASK_PREEMPT, KVMLP_OFF_TASK_CFS_RQ, KVMLP_OFF_CFS_RQ_RQ,
			       KVMLP_OFF_RQ_CPU, KVMLP_PCPU_PREEMPT, KVMLP_OFF_PCPU_RUNQUEUES,
			       KVMLP_OFF_TASK_STACK);
}

#if KVMLP_PENDING_TASK
/* (the first found returns: or-ing every slot's answer made the verifier take each
 * slot's branches apart, 256k instructions processed for the begin handler at each
 * start against 34k: bench/README.md, start-up) */
static __always_inline int any_live(struct pending_slots *p, u32 epoch, int except)
{
#pragma unroll
	for (int i = 0; i < KVMLP_NEST; i++) {
		if (i != except && p->lock[i] && p->epoch[i] == epoch)
			return 1;
	}
	return 0;
}

static __always_inline struct pending_slots *slots_of(int irq, u64 flags)
{
	int zero = 0;
	return irq ? irq_pending.lookup(&zero) :
		pending.task_storage_get(bpf_get_current_task_btf(), 0, flags);
}

static __always_inline void begin_wait(void *ctx, u64 now, u64 lock, u32 flags,
				       struct kvmlp_arm *arm, int irq)
{
	u32 epoch = arm->epoch;
	struct pending_slots *p = slots_of(irq, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!p) {
		count(KVMLP_C_LOST_PENDING_FULL);
		return;
	}
	/* An interrupt's wait open at this level or deeper belongs to an earlier
	 * interrupt (one context a level on a CPU, and a spinning waiter takes no
	 * other lock): its end was missed (our program was running on the CPU). A
	 * pass of its own: inside the slot search, its branches multiplied the
	 * search's for the verifier (34k instructions processed against 24k). */
	if (irq > KVMLP_IRQ_LEVEL_UNKNOWN) {
#pragma unroll
		for (int i = 0; i < KVMLP_NEST; i++) {
			if (p->lock[i] && p->epoch[i] == epoch && p->level[i] >= irq &&
			    p->lock[i] != lock) {
				count(KVMLP_C_BEGIN_WITHOUT_END);
				p->lock[i] = 0;
			}
		}
	}
	/* The slot: this lock's, else a free one (or an earlier epoch's), else
	 * the oldest (most likely a wait whose end was missed). */
	int slot = KVMLP_NEST, free = KVMLP_NEST;
#pragma unroll
	for (int i = 0; i < KVMLP_NEST; i++) {
		int live = p->lock[i] && p->epoch[i] == epoch;
		if (live && p->lock[i] == lock)
			slot = i;
		if (free == KVMLP_NEST && !live)
			free = i;
	}
	if (slot < KVMLP_NEST && continues(p->flags[slot], flags)) {
		/* keep the first start and stack, take how it finally waits */
		p->flags[slot] = flags;
		return;
	}
	if (slot < KVMLP_NEST) {
		count(KVMLP_C_BEGIN_WITHOUT_END);
	} else if (free < KVMLP_NEST) {
		slot = free;
	} else {
		count(KVMLP_C_LOST_PENDING_FULL);
		slot = 0;
#pragma unroll
		for (int i = 1; i < KVMLP_NEST; i++) {
			if (p->ts_ns[i] < p->ts_ns[slot & (KVMLP_NEST - 1)])
				slot = i;
		}
	}
	/* the index is < KVMLP_NEST on every path; the mask tells the verifier */
	slot &= KVMLP_NEST - 1;
	/* inside another wait: of this task, of this CPU's interrupts, or (in an
	 * interrupt) of the task it interrupted */
	int nested = any_live(p, epoch, slot);
	if (irq && !nested) {
		struct pending_slots *t = slots_of(0, 0);
		nested = t && any_live(t, epoch, KVMLP_NEST);
	}
	u32 owner = owner_of(lock, flags);      /* (before our walk: the owner at the begin) */
	s32 stack_id = walk_stack(ctx, now, arm);
	if (stack_id != KVMLP_NO_STACK)
		now = bpf_ktime_get_ns();       /* the wait starts after our walk */
	p->ts_ns[slot] = now;
	p->stack_id[slot] = stack_id;
	p->flags[slot] = flags;
	p->epoch[slot] = epoch;
	p->nested[slot] = nested;
	p->owner[slot] = owner;
	p->level[slot] = irq;
	p->lock[slot] = lock;
}

/* The wait on `lock` that ends now: 1 and its start, flags, stack and whether it
 * was nested, or 0. */
static __always_inline int end_wait(u64 lock, u32 epoch, u64 *ts_ns, u32 *flags,
				    s32 *stack_id, u32 *nested, u32 *owner, int irq)
{
	struct pending_slots *p = slots_of(irq, 0);
	if (!p)
		return 0;
#pragma unroll
	for (int i = 0; i < KVMLP_NEST; i++) {
		if (p->lock[i] == lock) {
			p->lock[i] = 0;
			if (p->epoch[i] != epoch)
				return 0;               /* stale: its wait's end was missed */
			*ts_ns = p->ts_ns[i];
			*flags = p->flags[i];
			*stack_id = p->stack_id[i];
			*nested = p->nested[i];
			*owner = p->owner[i];
			return 1;
		}
	}
	return 0;
}
#else
/* An interrupt's waits under tid ~0 and its CPU, apart from its task's (see
 * irq_pending). Nesting is not told on this path (no per-task view of its waits). */
static __always_inline struct pending_key key_of(u64 lock, int irq)
{
	struct pending_key k = {};
	k.tid = irq ? ~0U : (u32)bpf_get_current_pid_tgid();
	k.cpu = k.tid && !irq ? 0 : bpf_get_smp_processor_id();
	k.lock_addr = lock;
	return k;
}

static __always_inline void begin_wait(void *ctx, u64 now, u64 lock, u32 flags,
				       struct kvmlp_arm *arm, int irq)
{
	u32 epoch = arm->epoch;
	struct pending_key k = key_of(lock, irq);
	struct pending_val *p = pending.lookup(&k);
	if (p && p->epoch == epoch && continues(p->flags, flags)) {
		p->flags = flags;       /* as above */
		return;
	}
	if (p && p->epoch == epoch)
		count(KVMLP_C_BEGIN_WITHOUT_END);
	struct pending_val v = {};
	v.owner = owner_of(lock, flags);        /* as above */
	v.stack_id = walk_stack(ctx, now, arm);
	v.ts_ns = v.stack_id != KVMLP_NO_STACK ? bpf_ktime_get_ns() : now;   /* as above */
	v.flags = flags;
	v.epoch = epoch;
	if (pending.update(&k, &v))
		count(KVMLP_C_LOST_PENDING_FULL);
}

static __always_inline int end_wait(u64 lock, u32 epoch, u64 *ts_ns, u32 *flags,
				    s32 *stack_id, u32 *nested, u32 *owner, int irq)
{
	*nested = 0;
	struct pending_key k = key_of(lock, irq);
	struct pending_val *p = pending.lookup(&k);
	if (!p)
		return 0;
	if (p->epoch != epoch) {
		pending.delete(&k);     /* stale, as above */
		return 0;
	}
	*ts_ns = p->ts_ns;
	*flags = p->flags;
	*stack_id = p->stack_id;
	*owner = p->owner;
	pending.delete(&k);
	return 1;
}
#endif

#if KVMLP_VCPU_EXITS
/* Each vCPU thread's open windows (see kvmlp_basis in contention.h): an exit's
 * handling nests inside a KVM_RUN. LRU: a thread that exits mid-window ages out. */
struct vcpu_window {
	u64 exit_ns;            /* kvm_exit's time; 0: not in an exit's handling */
	u64 exit_wait_ns;
	u64 run_ns;             /* KVM_RUN's entry; 0: not in KVM_RUN */
	u64 run_wait_ns;
	u32 exit_waits;
	u32 run_waits;
	u32 isa;
	u32 reason;
	u32 vcpu_id;
	u32 pad;
};
BPF_TABLE("lru_hash", u32, struct vcpu_window, vcpu_windows, KVMLP_FILTER_ENTRIES);
BPF_HASH(vcpu_exits, struct kvmlp_exit_key, struct kvmlp_exit_val, KVMLP_AGG_ENTRIES);
BPF_HASH(vcpu_exit_waits, struct kvmlp_exit_wait_key, struct kvmlp_exit_wait_val,
	 KVMLP_AGG_ENTRIES);
/* KVM_RUN, _IO(KVMIO, 0x80) (include/uapi/linux/kvm.h) */
#define KVMLP_KVM_RUN 0xae80

static __always_inline struct vcpu_window *vcpu_window(u64 id, int create)
{
	u32 tid = (u32)id;
	struct vcpu_window *w = vcpu_windows.lookup(&tid);
	if (w || !create)
		return w;
	struct vcpu_window zero = {};
	w = vcpu_windows.lookup_or_try_init(&tid, &zero);
	if (!w)
		count(KVMLP_C_LOST_VCPU_FULL);
	return w;
}

/* A window ends: one more of its kind and reason, its time and the waits inside. */
static __always_inline void close_window(u64 id, u32 basis, u32 isa, u32 reason, u32 vcpu_id,
					 u64 ns, u64 wait_ns, u32 waits)
{
	struct kvmlp_exit_key k = {};
	k.tgid = id >> 32;
	k.tid = (u32)id;
	k.basis = basis;
	k.isa = isa;
	k.reason = reason;
	k.vcpu_id = vcpu_id;
	struct kvmlp_exit_val zero = {}, *v = vcpu_exits.lookup_or_try_init(&k, &zero);
	if (!v) {
		count(KVMLP_C_LOST_VCPU_FULL);
		return;
	}
	kvmlp_add(&v->count, 1);
	kvmlp_add(&v->time_ns, ns);
	kvmlp_add(&v->wait_ns, wait_ns);
	kvmlp_add(&v->waits, waits);
}

static __always_inline void add_exit_wait(u64 id, u64 lock, u32 flags, u32 basis, u32 isa,
					  u32 reason, u64 wait)
{
	struct kvmlp_exit_wait_key k = {};
	k.lock_addr = lock;
	k.tgid = id >> 32;
	k.tid = (u32)id;
	k.basis = basis;
	k.isa = isa;
	k.reason = reason;
	k.flags = flags;
	struct kvmlp_exit_wait_val zero = {}, *v = vcpu_exit_waits.lookup_or_try_init(&k, &zero);
	if (!v) {
		count(KVMLP_C_LOST_VCPU_FULL);
		return;
	}
	kvmlp_add(&v->count, 1);
	kvmlp_add(&v->wait_ns, wait);
}

/* A wait that ended on this thread, begun at `start`: inside which windows? */
static __always_inline void vcpu_wait(u64 id, u64 lock, u32 flags, u64 start, u64 wait)
{
	struct vcpu_window *w = vcpu_window(id, 0);
	if (!w)
		return;
	if (w->exit_ns && start >= w->exit_ns) {
		w->exit_wait_ns += wait;
		w->exit_waits++;
		add_exit_wait(id, lock, flags, KVMLP_BASIS_EXIT, w->isa, w->reason, wait);
	}
	if (w->run_ns && start >= w->run_ns) {
		w->run_wait_ns += wait;
		w->run_waits++;
		add_exit_wait(id, lock, flags, KVMLP_BASIS_RUN, 0, KVMLP_REASON_ANY, wait);
	}
}

/* Perf-attached (the kvm_exit reason is a field of the formatted event only, and
 * the ioctl's cmd of the syscall's): each returns 1 so perf's listeners get the
 * event too (0 would drop it for them). */
TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
	if (args->cmd != KVMLP_KVM_RUN)
		return 1;
	u64 id = bpf_get_current_pid_tgid();
	if (!wanted_process(id >> 32))
		return 1;
	struct vcpu_window *w = vcpu_window(id, 1);
	if (w) {
		w->run_ns = bpf_ktime_get_ns();
		w->run_wait_ns = 0;
		w->run_waits = 0;
		w->exit_ns = 0;
	}
	return 1;
}

TRACEPOINT_PROBE(kvm, kvm_userspace_exit)
{
	u64 now = bpf_ktime_get_ns();
	u64 id = bpf_get_current_pid_tgid();
	struct vcpu_window *w = vcpu_window(id, 0);
	if (!w || !w->run_ns)
		return 1;
	/* a failed or interrupted run (errno < 0): its reason field is stale */
	u32 reason = args->errno < 0 ? KVMLP_REASON_ERRNO | (u32)-args->errno : args->reason;
	close_window(id, KVMLP_BASIS_RUN, 0, reason, ~0U, now - w->run_ns,
		     w->run_wait_ns, w->run_waits);
	w->run_ns = 0;
#if KVMLP_EXIT_TP
	/* an exit handled in user space (I/O, MMIO): the kernel's part ends here */
	if (w->exit_ns)
		close_window(id, KVMLP_BASIS_EXIT, w->isa, w->reason, w->vcpu_id,
			     now - w->exit_ns, w->exit_wait_ns, w->exit_waits);
#endif
	w->exit_ns = 0;
	return 1;
}

#if KVMLP_EXIT_TP
TRACEPOINT_PROBE(kvm, kvm_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!wanted_process(id >> 32))
		return 1;
	struct vcpu_window *w = vcpu_window(id, 1);
	if (!w)
		return 1;
	w->exit_ns = bpf_ktime_get_ns();
	w->exit_wait_ns = 0;
	w->exit_waits = 0;
#if KVMLP_EXIT_TP == 1          /* x86: VMX or SVM exit code, and which */
	w->isa = args->isa;
	w->reason = args->exit_reason;
	w->vcpu_id = args->vcpu_id;
#else                           /* arm64: the exception class (ESR_ELx_EC) */
	w->isa = 0;
	w->reason = args->esr_ec;
	w->vcpu_id = ~0U;
#endif
	return 1;
}

TRACEPOINT_PROBE(kvm, kvm_entry)
{
	u64 now = bpf_ktime_get_ns();
	u64 id = bpf_get_current_pid_tgid();
	struct vcpu_window *w = vcpu_window(id, 0);
	if (!w || !w->exit_ns)
		return 1;
	close_window(id, KVMLP_BASIS_EXIT, w->isa, w->reason, w->vcpu_id, now - w->exit_ns,
		     w->exit_wait_ns, w->exit_waits);
	w->exit_ns = 0;
	return 1;
}
#endif
#endif

/* A wait runs from its begin handler (after the stack walk, if one was done)
 * to the top of its end handler: our own walk is not the lock's wait, and a
 * walked wait would otherwise read a walk longer than its unwalked twin, which
 * skews every per-caller number (callers come from walked waits). The rest of
 * the handlers falls inside every wait alike (the resolution floor, measured:
 * manifest handler_ns). An outside clock (perf, ftrace) sees the walk inside. */
/* A lock the waiter can tell (lock_kinds): its own mm's mmap_lock (or the spinlock
 * inside it that its waiters queue under), a bucket of its process's private futex
 * hash, or a lock on its
 * own kernel stack (a completion's, a wait queue's: the frame holding it is its
 * caller's); not a kernel thread's nor an interrupt's (a kernel thread working on a
 * process's mm, kthread_use_mm, would tell that process's lock as its own). And, by
 * any waiter, a page allocator zone's lock: the spinlock whose zone's zone_pgdat
 * holds that zone in its node_zones. */
static __always_inline void tell_kind(u64 lock, u64 id, s32 stack_id, u32 flags, int irq)
{
	struct kvmlp_lock_kind_val v = {};
	v.stack_id = stack_id;
#if KVMLP_OFF_ZONE_LOCK >= 0 && KVMLP_OFF_ZONE_PGDAT >= 0 && \
	KVMLP_OFF_PGDAT_NODE_ZONES >= 0 && KVMLP_OFF_PGDAT_NODE_ZONELISTS >= 0 && \
	KVMLP_OFF_PGDAT_NODE_ID >= 0
	if (flags == KVMLP_LCB_F_SPIN) {        /* a spinlock's wait, nothing else */
		u64 zone = lock - KVMLP_OFF_ZONE_LOCK, pgdat = 0;
		bpf_probe_read_kernel(&pgdat, sizeof(pgdat), (void *)(zone + KVMLP_OFF_ZONE_PGDAT));
		u64 first = pgdat + KVMLP_OFF_PGDAT_NODE_ZONES;
		if (pgdat && zone >= first && zone < pgdat + KVMLP_OFF_PGDAT_NODE_ZONELISTS) {
			int node = 0;
			bpf_probe_read_kernel(&node, sizeof(node),
					      (void *)(pgdat + KVMLP_OFF_PGDAT_NODE_ID));
			v.kind = KVMLP_LOCK_ZONE;
			v.id = ((u32)node << 16) | (u32)((zone - first) & 0xffff);
			lock_kinds.update(&lock, &v);
			return;
		}
	}
#endif
	if (irq)
		return;
	u64 task = bpf_get_current_task();
#if KVMLP_OFF_TASK_FLAGS >= 0
	u32 pflags = 0;
	bpf_probe_read_kernel(&pflags, sizeof(pflags), (void *)(task + KVMLP_OFF_TASK_FLAGS));
	if (pflags & KVMLP_PF_KTHREAD)
		return;
#endif
#if KVMLP_OFF_TASK_MM >= 0 && KVMLP_OFF_MM_MMAP_LOCK >= 0
	u64 mm = 0;
	bpf_probe_read_kernel(&mm, sizeof(mm), (void *)(task + KVMLP_OFF_TASK_MM));
	if (mm && lock == mm + KVMLP_OFF_MM_MMAP_LOCK) {
		v.kind = KVMLP_LOCK_MM;
		v.id = id >> 32;
	}
#if KVMLP_OFF_RWSEM_WAIT_LOCK >= 0
	else if (mm && lock == mm + KVMLP_OFF_MM_MMAP_LOCK + KVMLP_OFF_RWSEM_WAIT_LOCK) {
		v.kind = KVMLP_LOCK_MM_WAIT_LOCK;
		v.id = id >> 32;
	}
#endif
#endif
#if KVMLP_OFF_TASK_MM >= 0 && KVMLP_OFF_MM_MMAP_LOCK >= 0 && KVMLP_OFF_MM_FUTEX_PHASH >= 0 && \
	KVMLP_OFF_FPH_HASH_MASK >= 0 && \
	KVMLP_OFF_FPH_QUEUES >= 0 && KVMLP_OFF_FHB_LOCK >= 0 && KVMLP_OFF_FHB_SIZE > 0
	u64 ph = 0;
	if (!v.kind && mm)
		bpf_probe_read_kernel(&ph, sizeof(ph), (void *)(mm + KVMLP_OFF_MM_FUTEX_PHASH));
	if (ph) {
		u32 mask = 0;
		bpf_probe_read_kernel(&mask, sizeof(mask), (void *)(ph + KVMLP_OFF_FPH_HASH_MASK));
		u64 at = lock - (ph + KVMLP_OFF_FPH_QUEUES) - KVMLP_OFF_FHB_LOCK;
		if (at < ((u64)mask + 1) * KVMLP_OFF_FHB_SIZE && at % KVMLP_OFF_FHB_SIZE == 0) {
			v.kind = KVMLP_LOCK_FUTEX;
			v.id = id >> 32;
		}
	}
#endif
#if KVMLP_OFF_TASK_STACK >= 0
	u64 stack = 0;
	bpf_probe_read_kernel(&stack, sizeof(stack), (void *)(task + KVMLP_OFF_TASK_STACK));
	if (!v.kind && stack && lock - stack < KVMLP_THREAD_SIZE) {
		v.kind = KVMLP_LOCK_STACK;
		v.id = (u32)id;
	}
#endif
	if (v.kind)
		lock_kinds.update(&lock, &v);
}

/* Attached to sys_enter only while user space finds the run queues (run_queues()):
 * its own thread, pinned to each CPU in turn, makes a syscall there, and the run
 * queue its task is on is that CPU's (its CFS entity's cfs_rq->rq). */
int run_queue_of_cpu(struct bpf_raw_tracepoint_args *ctx)
{
#if KVMLP_OFF_TASK_CFS_RQ >= 0 && KVMLP_OFF_CFS_RQ_RQ >= 0
	int zero = 0;
	struct kvmlp_arm *arm = armed.lookup(&zero);
	if (!arm || (u32)bpf_get_current_pid_tgid() != arm->finder_tid)
		return 0;
	u64 rq = current_rq(KVMLP_OFF_TASK_CFS_RQ, KVMLP_OFF_CFS_RQ_RQ);
	int cpu = bpf_get_smp_processor_id();
	run_queues.update(&cpu, &rq);
#endif
	return 0;
}

#if KVMLP_OWNERS && KVMLP_ID_KFUNC_TASK_FROM_PID > 0 && KVMLP_ID_KFUNC_TASK_RELEASE > 0 && \
	KVMLP_OFF_TASK_ON_CPU >= 0 && KVMLP_OFF_TASK_NVCSW >= 0 && KVMLP_OFF_TASK_NIVCSW >= 0 && \
	KVMLP_ID_TP_CONTENTION_BEGIN > 0
/* --lock-owner: the owner's kernel stack as a wait on its lock begins, where the owner
 * sleeps (a running owner's saved stack is stale: none taken). bpf_get_task_stack
 * takes a task pointer only a kfunc gives, and only a tracing program may call
 * bpf_task_from_pid: this is a tp_btf program of its own on lock:contention_begin,
 * which ContentionProbe loads and attaches (bcc 0.26 loads no tp_btf), at most one
 * walk per walk_ns per CPU (the stack budget's pace). */
static u64 (*kvmlp_task_from_pid)(s32 pid) = KVMLP_KFUNC(KVMLP_ID_KFUNC_TASK_FROM_PID);
static void (*kvmlp_task_release)(u64 task) = KVMLP_KFUNC(KVMLP_ID_KFUNC_TASK_RELEASE);
BPF_F_TABLE("hash", struct kvmlp_owner_stack_key, struct kvmlp_owner_stack_val, owner_stacks,
	    KVMLP_AGG_ENTRIES, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(owner_stack_buf, struct kvmlp_owner_stack_val, 1);
BPF_PERCPU_ARRAY(owner_walked_ns, u64, 1);

/* A task's voluntary plus involuntary context switches, ~0 while it is on a CPU. */
static __always_inline u64 switches(u64 task)
{
	u32 on_cpu = 1;
	u64 nvcsw = 0, nivcsw = 0;
	bpf_probe_read_kernel(&on_cpu, sizeof(on_cpu), (void *)(task + KVMLP_OFF_TASK_ON_CPU));
	bpf_probe_read_kernel(&nvcsw, sizeof(nvcsw), (void *)(task + KVMLP_OFF_TASK_NVCSW));
	bpf_probe_read_kernel(&nivcsw, sizeof(nivcsw), (void *)(task + KVMLP_OFF_TASK_NIVCSW));
	return on_cpu ? ~0ULL : nvcsw + nivcsw;
}

int owner_stack(u64 *ctx)               /* (void *lock, unsigned int flags) */
{
	u64 lock = ctx[0];
	u32 flags = (u32)ctx[1];
	int zero = 0;
	struct kvmlp_arm *arm = armed.lookup(&zero);
	u64 id = bpf_get_current_pid_tgid();
	/* a mutex spins only while its owner runs */
	if (!arm || !arm->on || (flags & KVMLP_LCB_F_SPIN) || !wanted_process(id >> 32) ||
	    !wanted(id, lock) || !wanted_type(flags, KVMLP_TYPE_BEGIN))
		return 0;
	u32 pid = owner_of(lock, flags);
	u64 now = bpf_ktime_get_ns(), *last = owner_walked_ns.lookup(&zero);
	if (!pid || !last || now - *last < arm->walk_ns)
		return 0;
	*last = now;
	struct kvmlp_owner_stack_val *v = owner_stack_buf.lookup(&zero);
	u64 task = kvmlp_task_from_pid(pid);
	if (!task)
		return 0;
	/* It may run again meanwhile, and a running task's stack read from another CPU is
	 * garbage: kept only if it was off CPU, and switched neither in nor out, from
	 * before the walk to after it (its context-switch counts, on_cpu). */
	u64 before = switches(task), after = 0;
	long n = 0;
	if (v && before != ~0ULL)
		n = bpf_get_task_stack((void *)task, v->ips, sizeof(v->ips), 0);
	if (n > 0)
		after = switches(task);
	kvmlp_task_release(task);
	if (!v || n <= 0 || after != before)
		return 0;
	struct kvmlp_owner_stack_key k = {.lock_addr = lock, .owner = pid};
	u64 h = 14695981039346656037ULL;        /* FNV-1a over the frames */
#pragma unroll
	for (int i = 0; i < KVMLP_OWNER_DEPTH; i++)
		h = (h ^ v->ips[i]) * 1099511628211ULL;
	k.hash = (u32)(h ^ (h >> 32));
	struct kvmlp_owner_stack_val *had = owner_stacks.lookup(&k);
	if (had) {
		kvmlp_add(&had->count, 1);
	} else {
		v->count = 1;
		if (owner_stacks.update(&k, v))
			count(KVMLP_C_LOST_AGG_FULL);
	}
	return 0;
}
#endif

#if KVMLP_ID_KFUNC_GET_KMEM_CACHE > 0 && KVMLP_OFF_KMEM_CACHE_NAME >= 0
/* 6.13+: the slab cache of an object's address (NULL: in no slab object). */
static u64 (*kvmlp_get_kmem_cache)(u64 addr) = KVMLP_KFUNC(KVMLP_ID_KFUNC_GET_KMEM_CACHE);
BPF_ARRAY(slab_queries, struct kvmlp_slab_query, KVMLP_SLAB_BATCH);

/* Never attached: run by user space (BPF_PROG_TEST_RUN, args[0] the number of
 * queries) on lock addresses it has no name for, once each, in slab_queries. */
int slab_caches(struct bpf_raw_tracepoint_args *ctx)
{
	u32 n = ctx->args[0];
	for (int i = 0; i < KVMLP_SLAB_BATCH && i < n; i++) {
		int k = i;
		struct kvmlp_slab_query *q = slab_queries.lookup(&k);
		if (!q)
			break;
		u64 cache = kvmlp_get_kmem_cache(q->addr), name = 0;
		q->cache[0] = 0;
		if (cache && !bpf_probe_read_kernel(&name, sizeof(name),
						    (void *)(cache + KVMLP_OFF_KMEM_CACHE_NAME)))
			bpf_probe_read_kernel_str(q->cache, sizeof(q->cache), (void *)name);
	}
	return 0;
}
#endif

/* Set while this CPU runs our end handler. A wait begun under it (an interrupt's, or
 * one on a lock our handler's map update takes) ends under it too, where the kernel
 * skips the handler (recursion_misses): kept, its begin would stay open and make its
 * task's or CPU's later waits read nested. */
BPF_PERCPU_ARRAY(in_end, u32, 1);

RAW_TRACEPOINT_PROBE(contention_begin)     /* (void *lock, unsigned int flags) */
{
	u64 now = bpf_ktime_get_ns();
	/* Waits are taken only once contention_end is attached too (see armed). */
	int zero = 0;
	struct kvmlp_arm *arm = armed.lookup(&zero);
	u64 id = bpf_get_current_pid_tgid();
	if (!arm || !arm->on || !wanted_process(id >> 32))
		return 0;
	if (!wanted(id, ctx->args[0]) ||
	    !wanted_type((u32)ctx->args[1], KVMLP_TYPE_BEGIN)) {
		count(KVMLP_C_FILTERED);
		return 0;
	}
	count(KVMLP_C_BEGIN);
	u32 *busy = in_end.lookup(&zero);
	if (busy && *busy) {
		count(KVMLP_C_BEGIN_UNDER_END);
		return 0;
	}
	begin_wait(ctx, now, ctx->args[0], (u32)ctx->args[1], arm,
		   interrupted());
	return 0;
}

static __always_inline int end_of_wait(struct bpf_raw_tracepoint_args *ctx, u64 now)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	u64 lock = ctx->args[0];
	if (!wanted_process(tgid) || !wanted(id, lock))
		return 0;               /* (its begin was counted as filtered) */
#if !KVMLP_FILTER_TYPE
	count(KVMLP_C_END);
#endif
	u64 start = 0;
	u32 flags = 0, nested = 0, owner = 0;
	s32 stack_id = KVMLP_NO_STACK;
	int zero_idx = 0;
	int irq = interrupted() != 0;
	struct kvmlp_arm *arm = armed.lookup(&zero_idx);
	if (!arm || !end_wait(lock, arm->epoch, &start, &flags, &stack_id, &nested, &owner,
				 irq)) {
#if !KVMLP_FILTER_TYPE  /* (with -Y: most likely the end of a type it dropped) */
		count(KVMLP_C_END_WITHOUT_BEGIN);
#endif
		return 0;
	}
#if KVMLP_FILTER_TYPE
	count(KVMLP_C_END);
#endif
	u64 wait = now - start;
	if (!wanted_type(flags, KVMLP_TYPE_END)) {
		count(KVMLP_C_FILTERED_END);
		return 0;
	}

	struct kvmlp_agg_key ak = {};
	ak.lock_addr = lock;
	ak.tgid = tgid;
	ak.flags = flags;
	ak.stack_id = stack_id;
	struct kvmlp_agg_val *a = agg.lookup(&ak);
	if (stack_id == KVMLP_NO_STACK && (!a || !a->count)) {
		s32 first = first_stack(ctx, &ak);
		if (first != KVMLP_NO_STACK) {
			ak.stack_id = stack_id = first;
			a = agg.lookup(&ak);
		}
	}
	if (!a) {
		struct kvmlp_agg_val *zero = agg_zero.lookup(&zero_idx);
		a = zero ? agg.lookup_or_try_init(&ak, zero) : NULL;
		if (a)          /* (not with the map full: that would be every wait) */
			tell_kind(lock, id, stack_id, flags, irq);
	}
	if (a) {
		kvmlp_add(&a->count, 1);
		kvmlp_add(&a->total_ns, wait);
		kvmlp_max(&a->max_ns, wait);
		kvmlp_min_nonzero(&a->min_ns, wait);
		kvmlp_add(&a->hist[kvmlp_slot(wait)], 1);
	} else {
		count(KVMLP_C_LOST_AGG_FULL);
	}
	if (irq)
		count(KVMLP_C_IRQ_WAITS);
	if (nested) {
		count(KVMLP_C_NESTED);
		struct kvmlp_nested_key nk = {};
		nk.lock_addr = lock;
		nk.tgid = tgid;
		nk.irq = irq;
		struct kvmlp_nested_val nzero = {}, *nv = nested_waits.lookup_or_try_init(&nk, &nzero);
		if (nv) {
			kvmlp_add(&nv->count, 1);
			kvmlp_add(&nv->total_ns, wait);
		} else {
			count(KVMLP_C_LOST_AGG_FULL);
		}
	}
#if KVMLP_OWNERS
	if (owner) {
		struct kvmlp_owner_key ok = {.lock_addr = lock, .owner = owner};
		struct kvmlp_owner_val oz = {}, *ov = lock_owners.lookup_or_try_init(&ok, &oz);
		if (ov) {
			kvmlp_add(&ov->count, 1);
			kvmlp_add(&ov->total_ns, wait);
		} else {
			count(KVMLP_C_LOST_AGG_FULL);
		}
	}
#endif
#if KVMLP_VCPU_EXITS
	if (!nested && !irq)    /* a vCPU's own outermost waits: shares never double count */
		vcpu_wait(id, lock, flags, start, wait);
#endif

	u64 every = arm->sample_every;
	if (!every)
		return 0;
	if (every > 1) {
		u64 *tick = sample_tick.lookup(&zero_idx);
		if (!tick || (*tick)++ % every)
			return 0;
	}
	struct kvmlp_contention_event *e = events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		count(KVMLP_C_LOST_RINGBUF_FULL);
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
	e->ret = (s32)ctx->args[1];
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	/* The reader polls on a timer; a wakeup per sample would cost more than
	 * the sample.  Every KVMLP_WAKEUP_EVERY samples on a CPU wake it early. */
	int idx = KVMLP_C_SAMPLED;
	u64 *n = counters.lookup(&idx);
	u64 wake = BPF_RB_NO_WAKEUP;
	if (n && ++(*n) % KVMLP_WAKEUP_EVERY == 0)
		wake = BPF_RB_FORCE_WAKEUP;
	events.ringbuf_submit(e, wake);
	return 0;
}

RAW_TRACEPOINT_PROBE(contention_end)       /* (void *lock, int ret) */
{
	u64 now = bpf_ktime_get_ns();
	int zero = 0;
	u32 *busy = in_end.lookup(&zero);
	if (busy)
		*busy = 1;
	end_of_wait(ctx, now);
	if (busy)
		*busy = 0;
	return 0;
}

#if KVMLP_FILTER_TGID && KVMLP_FOLLOW_FORK
/* (struct task_struct *parent, struct task_struct *child): the child's pid is
 * read from the tracepoint's ftrace format instead (no struct offset needed),
 * so a thread is added too: it leaves at its exit, below. */
TRACEPOINT_PROBE(sched, sched_process_fork)
{
	u32 parent = bpf_get_current_pid_tgid() >> 32;
	if (!tgid_filter.lookup(&parent))
		return 1;               /* 1: perf's listeners get the event too */
	u32 child = args->child_pid;    /* a new process's tgid, or a thread's id */
	u8 one = 1;
	if (tgid_filter.update(&child, &one))
		count(KVMLP_C_LOST_FILTER_FULL);
	return 1;
}
#endif
#if KVMLP_FILTER_TGID
/* A thread that exits leaves the filter (it was added at its fork). Not a
 * process's leader: its other threads may still be exiting, and their waits
 * (the VM's teardown, its mm) are the process's; a process stays followed. */
RAW_TRACEPOINT_PROBE(sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	if (tid != id >> 32 && !tgid_filter.delete(&tid))
		count(KVMLP_C_FILTER_EXITS);
	return 0;
}
#endif
