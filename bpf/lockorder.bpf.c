/* lockorder: a lockdep-lite for KVM's own locks on a production kernel. Every
 * lock and unlock entry point (spin, rwlock, mutex, rwsem, SRCU read sections)
 * runs this, and one lookup of the lock's page tells whether the lock lies
 * inside a watched KVM object (a struct kvm or kvm_vcpu and their containers,
 * registered at their first ioctl): the host's other locks stop there. For
 * watched locks a per-task stack of those held gives order edges (held ->
 * acquired, first stack kept), each acquisition's context (task/irq, IRQs and
 * softirqs held off or on, the lock it was taken under) and recursion (a lock
 * taken again by the task holding it: streamed with both stacks; a lock still held
 * when its task returns to user space or exits, once per acquisition), and how long
 * each followed lock was held, by where it was taken. Trylocks are
 * not hooked: a lock taken by trylock is not seen as held; nor is a lock of a kind
 * whose unlocks are not all probeable (lo_followed). */

enum lockorder_counter {
	LO_C_WATCHED, LO_C_RELEASES, LO_C_UNMATCHED_RELEASES, LO_C_DEPTH_OVERFLOW,
	LO_C_RECURSIONS, LO_C_LOST_RINGBUF_FULL, LO_C_LOST_AGG_FULL, LO_C_LOST_HELD_FULL,
	LO_C_OBJECTS_WATCHED, LO_C_LOST_PAGES_FULL, LO_C_FAILED_ACQUISITIONS,
	/* the holds' join to the waits: how each wait and owner was decided */
	LO_C_WAITS_UNDER_OWNER, LO_C_WAITS_UNDER_NEXT, LO_C_WAITS_NO_HOLDER,
	LO_C_OWNERS_AT_ENTRY, LO_C_OWNERS_AT_WAIT_END, LO_C_NEXT_AT_ENTRY,
	LO_C_OWNERS_PROMOTED, LO_C_OWNERS_RELEASED, LO_C_OWNERS_DROPPED, LO_C_WAITS_SELF_OWNER, LO_C_WAITS_UNDER_LAST,
};
/* What was taken: the class of entry point. Values are recorded: append only. */
enum lo_kind {
	LO_SPIN, LO_READ, LO_WRITE, LO_MUTEX, LO_RWSEM_READ, LO_RWSEM_WRITE, LO_SRCU_READ,
	LO_SRCU_SYNC,   /* synchronize_srcu*: waits for the readers, held by no one */
	/* read_lock in_interrupt() (IRQ context, or BH off): a queued rwlock lets it past a
	 * waiting writer, lockdep's recursive reader; LO_READ is the one that queues */
	LO_READ_RECURSIVE,
};
/* What an event tells. Values are recorded: append only. */
enum lo_event {
	LO_EV_RECURSION,        /* a held lock taken again by its task */
	LO_EV_HELD_TO_USER,     /* held when the task returned to user space */
	LO_EV_HELD_AT_EXIT,     /* held when the task exited */
};
/* How the entry point leaves IRQs while the lock is held (C only: the acquisitions
 * record the IRQ state it gives). */
#define LO_PLAIN 0
#define LO_IRQ 1
#define LO_BH 2
#define LO_OBJ_KVM 1            /* struct lo_obj kind (C only) */
#define LO_OBJ_VCPU 2
#define LO_OBJ_WATCH 3          /* named by record --watch (user space fills lo_pages) */

#define LO_DEPTH 8              /* watched locks one task holds at once; loops over them
                                 * are unrolled: 6.1's verifier loses a strength-reduced
                                 * index's bound ("R6 min value is outside ...") */
#define LO_PAGE_SHIFT 12
#define LO_MAX_PAGES 32         /* pages one watched object may span */

struct lo_held_lock {
	u64 addr;
	u64 ts_ns;      /* taken (its entry point called; its wait's end where it waited) */
	u32 kind;
	s32 stack_id;
	u32 bh;         /* taken by a _bh entry point: BH off until its unlock */
	u32 told;       /* 1 << LO_EV_* already streamed for this acquisition */
};

struct lo_held {
	u32 n;
	u32 bh_held;    /* of the n, those taken by a _bh entry point */
	struct lo_held_lock l[LO_DEPTH];
};

/* A held stack per task, and one per CPU for IRQ context (its locks pair up
 * inside the interrupt and are never ordered after the interrupted task's). */
struct lo_held_key {
	u32 id;         /* tid, or the CPU in IRQ context */
	u32 irq;
};

struct lo_obj {
	u64 base[2];    /* a page may end one object and start the next */
	u32 size[2];
	u32 kind[2];    /* LO_OBJ_* */
};

struct lockorder_edge_key {
	u64 held;
	u64 acquired;
	u32 held_kind;
	u32 acquired_kind;
};

struct lockorder_edge_val {
	u64 count;
	s32 stack_id;   /* the first seen */
	u32 tgid;
};

struct lockorder_acq_key {
	u64 addr;
	u64 outer;      /* the innermost watched lock held, 0 if none */
	u32 kind;
	u32 context;    /* enum kvmlp_context */
	u32 irqs;       /* enum kvmlp_irqs, while held */
	u32 irqs_at_call;       /* before the call (an _irqsave saves this) */
	u32 softirqs;   /* enum kvmlp_irqs: softirqs while held (off: BH disabled) */
	u32 pad;
};

struct lockorder_acq_val {
	u64 count;
	s32 stack_id;   /* the first seen */
	u32 tgid;
};

/* How long a followed lock was held, per lock, kind and where it was taken (the
 * acquisition's stack): from its taking to its unlock's entry. Value: kvmlp_lat. */
struct lockorder_hold_key {
	u64 addr;
	u32 kind;
	s32 stack_id;
};

/* At the entry of a function chosen by --srcu-at: which watched SRCU read section
 * is held (0: none). */
struct lockorder_at_key {
	u64 ssp;
	u32 fn;         /* the --srcu-at slot */
	u32 context;
};

struct kvmlp_lockorder_event {
	u64 ts_ns;
	u64 addr;
	u32 kind;
	u32 held_kind;
	s32 stack_id;   /* taken again here */
	s32 held_stack_id;   /* first taken here */
	u32 depth;
	u32 context;
	u32 tid;
	u32 tgid;
	u32 what;       /* enum lo_event */
	u32 pad;
};

BPF_TABLE("lru_hash", u64, struct lo_obj, lo_pages, 16384);
BPF_HASH(lo_held_locks, struct lo_held_key, struct lo_held, 16384);
BPF_HASH(lockorder_edges, struct lockorder_edge_key, struct lockorder_edge_val, 8192);
BPF_HASH(lockorder_acqs, struct lockorder_acq_key, struct lockorder_acq_val, 8192);
BPF_HASH(lockorder_srcu_at, struct lockorder_at_key, struct lockorder_acq_val, 1024);
BPF_HASH(lockorder_holds, struct lockorder_hold_key, struct kvmlp_lat, 4096);

/* The holds joined to the waits they caused. Who holds a watched lock exclusively
 * (the kinds that make others wait: spin, write, mutex, rwsem write) as its hold key:
 * set where its taking is seen (the entry point when no one holds it, else the end
 * of its wait); `next` is the latest entrant while it was held, its holder once the
 * owner releases it, whether or not it waited. A wait on the lock is put down to the
 * holder when it begins. */
#define LO_NO_HOLDER 255        /* a wait no exclusive holder was seen for (readers) */
struct lo_owner_side {
	u32 id;                 /* struct lo_held_key's */
	u32 irq;
	struct lockorder_hold_key k;    /* k.addr 0: none */
};
struct lo_owner {
	struct lo_owner_side now;
	struct lo_owner_side next;
	struct lo_owner_side last;      /* released last: its unlock's entry seen */
};
/* lock:contention_begin's flags (include/trace/events/lock.h) and a queued rwlock's
 * writer byte (include/asm-generic/qrwlock.h: _QW_LOCKED, the low byte of cnts): a
 * rwlock wait is put down to a writer only if one holds it as the wait begins */
#define LO_LCB_F_SPIN 1
#define LO_LCB_F_RW 6           /* LCB_F_READ | LCB_F_WRITE */
#define LO_LCB_F_RT 8
#define LO_QW_LOCKED 0xff
BPF_HASH(lo_owners, u64, struct lo_owner, 4096);
struct lo_wait {
	u64 ts_ns;
	struct lockorder_hold_key k;    /* the holder it is put down to */
};
/* A thread's open waits: one, and one begun inside it (a queued rwlock's reader waits
 * for the lock's wait_lock within its wait for the lock; an interrupt's wait), each
 * closed by its own lock's contention_end. */
struct lo_waiting {
	struct lo_wait w[2];
};
BPF_HASH(lo_waits, u32, struct lo_waiting, 16384);
struct lockorder_caused_val {
	u64 count;
	u64 total_ns;
};
BPF_HASH(lockorder_caused, struct lockorder_hold_key, struct lockorder_caused_val, 4096);
BPF_ARRAY(lo_zero_held, struct lo_held, 1);
BPF_RINGBUF_OUTPUT(lockorder_events, KVMLP_RINGBUF_PAGES);
#define lo_count(i) kvmlp_count(KVMLP_CBASE_LOCKORDER + (i))

/* --- watched objects ------------------------------------------------------------ */

static __always_inline void lo_watch(u64 base, u32 size, u32 kind)
{
	if (!base || !size)
		return;
	u64 first = base >> LO_PAGE_SHIFT, last = (base + size - 1) >> LO_PAGE_SHIFT;
	u64 page = first;
	struct lo_obj *o = lo_pages.lookup(&page);
	if (o && (o->base[0] == base || o->base[1] == base))
		return;                 /* known: the common case, once per ioctl */
	lo_count(LO_C_OBJECTS_WATCHED);
#pragma unroll
	for (int i = 0; i < LO_MAX_PAGES; i++) {
		page = first + i;
		if (page > last)
			break;
		struct lo_obj n = {};
		o = lo_pages.lookup(&page);
		if (o)
			n = *o;
		/* slot 0 holds an object that starts before this page, slot 1 one that
		 * starts inside it: the two a page can share */
		if ((base >> LO_PAGE_SHIFT) < page) {
			n.base[0] = base;
			n.size[0] = size;
			n.kind[0] = kind;
		} else {
			n.base[1] = base;
			n.size[1] = size;
			n.kind[1] = kind;
		}
		if (lo_pages.update(&page, &n))
			lo_count(LO_C_LOST_PAGES_FULL);
	}
}

static __always_inline int lo_watched(u64 addr)
{
	u64 page = addr >> LO_PAGE_SHIFT;
	struct lo_obj *o = lo_pages.lookup(&page);
	if (!o)
		return 0;
	return (addr - o->base[0] < o->size[0]) || (addr - o->base[1] < o->size[1]);
}

/* --- context -------------------------------------------------------------------- */

/* x86 keeps preempt_count per CPU, out of reach: a softirq being served on a task's
 * stack (ksoftirqd) is told by the kernel's softirq_entry/exit events instead. Softirqs
 * do not nest on a CPU; one on the IRQ stack is "irq" with IRQs on (the Python). */
BPF_PERCPU_ARRAY(lo_serving_softirq, u32, 1);

RAW_TRACEPOINT_PROBE(softirq_entry)
{
	int z = 0;
	u32 *v = lo_serving_softirq.lookup(&z);
	if (v)
		*v = 1;
	return 0;
}

RAW_TRACEPOINT_PROBE(softirq_exit)
{
	int z = 0;
	u32 *v = lo_serving_softirq.lookup(&z);
	if (v)
		*v = 0;
	return 0;
}

static __always_inline u32 lo_context(void *ctx, int kprobe)
{
	u32 c = kvmlp_context(ctx, kprobe, KVMLP_OFF_LO_TASK_PREEMPT, KVMLP_OFF_LO_TASK_STACK);
	if (KVMLP_OFF_LO_TASK_PREEMPT < 0 && c == KVMLP_CTX_TASK) {
		int z = 0;
		u32 *v = lo_serving_softirq.lookup(&z);
		if (v && *v)
			return KVMLP_CTX_SOFTIRQ;
	}
	return c;
}

static __always_inline u32 lo_irqs(u32 at_call, u32 variant)
{
	return variant == LO_IRQ ? KVMLP_IRQS_OFF : at_call;
}

static __always_inline int lo_in_irq(u32 context)
{
	return context == KVMLP_CTX_HARDIRQ || context == KVMLP_CTX_SOFTIRQ ||
	       context == KVMLP_CTX_NMI || context == KVMLP_CTX_IRQ;
}

/* Softirqs while the lock is held, as lockdep's softirqs_enabled: off under a _bh
 * entry point (this one or a held lock's), in IRQ context, or where preempt_count
 * (arm64's thread_info) counts a BH disable; x86 keeps it per CPU: else unknown. */
static __always_inline u32 lo_softirqs(u32 context, int bh)
{
	if (bh || lo_in_irq(context))
		return KVMLP_IRQS_OFF;
	if (KVMLP_OFF_LO_TASK_PREEMPT < 0)
		return KVMLP_IRQS_UNKNOWN;
	u32 pc = kvmlp_read_u32(bpf_get_current_task(), KVMLP_OFF_LO_TASK_PREEMPT);
	return (pc & 0x0000ff00) ? KVMLP_IRQS_OFF : KVMLP_IRQS_ON;     /* SOFTIRQ_MASK */
}

static __always_inline void lo_held_key_of(struct lo_held_key *k, u32 context)
{
	k->irq = lo_in_irq(context);
	k->id = k->irq ? bpf_get_smp_processor_id() : (u32)bpf_get_current_pid_tgid();
}

/* --- acquire and release -------------------------------------------------------- */

static __always_inline void lo_edge(struct lo_held_lock *h, u64 addr, u32 kind, s32 *sid,
				    void *ctx)
{
	struct lockorder_edge_key k = {};
	k.held = h->addr;
	k.acquired = addr;
	k.held_kind = h->kind;
	k.acquired_kind = kind;
	struct lockorder_edge_val *v = lockorder_edges.lookup(&k);
	if (!v) {
		if (*sid < 0)
			*sid = kvmlp_stackid(ctx);
		struct lockorder_edge_val n = {};
		n.stack_id = *sid;
		n.tgid = bpf_get_current_pid_tgid() >> 32;
		lockorder_edges.insert(&k, &n);
		v = lockorder_edges.lookup(&k);
		if (!v) {
			lo_count(LO_C_LOST_AGG_FULL);
			return;
		}
	}
	kvmlp_add(&v->count, 1);
}

static __always_inline void lo_event(u64 addr, u32 kind, u32 held_kind, s32 sid,
				     s32 held_sid, u32 depth, u32 context, u32 what)
{
	struct kvmlp_lockorder_event *e = lockorder_events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		lo_count(LO_C_LOST_RINGBUF_FULL);
		return;
	}
	u64 id = bpf_get_current_pid_tgid();
	e->ts_ns = bpf_ktime_get_ns();
	e->addr = addr;
	e->kind = kind;
	e->held_kind = held_kind;
	e->stack_id = sid;
	e->held_stack_id = held_sid;
	e->depth = depth;
	e->context = context;
	e->tid = (u32)id;
	e->tgid = id >> 32;
	e->what = what;
	e->pad = 0;
	lockorder_events.ringbuf_submit(e, 0);
}

static __always_inline void lo_recursion(struct lo_held_lock *h, u64 addr, u32 kind,
					 s32 sid, u32 depth, u32 context)
{
	lo_count(LO_C_RECURSIONS);
	lo_event(addr, kind, h->kind, sid, h->stack_id, depth, context, LO_EV_RECURSION);
}

/* Watched locks the task still holds as it returns to user space or exits: lockdep's
 * "lock held when returning to user space!" and "still has locks held!" (a lock held
 * across a range its end never closes). Each acquisition once per kind of event. */
static __always_inline void lo_held_on_leaving(u32 what)
{
	struct lo_held_key k = {};
	k.id = (u32)bpf_get_current_pid_tgid();
	struct lo_held *held = lo_held_locks.lookup(&k);
	if (!held)
		return;
	u32 n = held->n;
#pragma unroll
	for (int i = 0; i < LO_DEPTH; i++) {
		struct lo_held_lock *h = &held->l[i & (LO_DEPTH - 1)];
		if (i >= n || (h->told & (1 << what)))
			continue;
		h->told |= 1 << what;
		/* its stack: where it was taken */
		lo_event(h->addr, h->kind, h->kind, h->stack_id, -1, n, KVMLP_CTX_TASK, what);
	}
	if (what == LO_EV_HELD_AT_EXIT)         /* its tid may be reused */
		lo_held_locks.delete(&k);
}

/* (every syscall of the host: one lookup of the task's held locks) */
RAW_TRACEPOINT_PROBE(sys_exit)
{
	lo_held_on_leaving(LO_EV_HELD_TO_USER);
	return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exit)
{
	lo_held_on_leaving(LO_EV_HELD_AT_EXIT);
	return 0;
}

static __always_inline int lo_reader(u32 kind)
{
	return kind == LO_READ || kind == LO_READ_RECURSIVE || kind == LO_RWSEM_READ ||
	       kind == LO_SRCU_READ;
}

/* A recursive reader taken again inside a read section is no recursion (lockdep's
 * check_deadlock()); any other kind can wait for the task itself. */
static __always_inline int lo_recursive_ok(u32 kind, u32 held_kind)
{
	return (kind == LO_READ_RECURSIVE || kind == LO_SRCU_READ) && lo_reader(held_kind);
}

/* A kind is followed (pushed on the held stack) only if every one of its unlocks is
 * probed: a release through an inlined unlock (arm64's spin unlocks) would leave a
 * phantom. Its acquisitions still give contexts, and edges into it. */
#define LO_ON(key) (KVMLP_M_##key != KVMLP_M_OFF)
static __always_inline int lo_followed(u32 kind)
{
	switch (kind) {
	case LO_SPIN: return LO_ON(LOUS) && LO_ON(LOUSB) && LO_ON(LOUSI) && LO_ON(LOUSF);
	case LO_READ:
	case LO_READ_RECURSIVE:
		return LO_ON(LOUR) && LO_ON(LOURB) && LO_ON(LOURI) && LO_ON(LOURF);
	case LO_WRITE: return LO_ON(LOUW) && LO_ON(LOUWB) && LO_ON(LOUWI) && LO_ON(LOUWF);
	case LO_MUTEX: return LO_ON(LOUM);
	case LO_RWSEM_READ:
	case LO_RWSEM_WRITE: return LO_ON(LOUD) && LO_ON(LOUE);
	case LO_SRCU_READ: return LO_ON(LOUC);
	default: return 0;      /* a grace-period wait holds nothing */
	}
}

static __always_inline int lo_exclusive(u32 kind)
{
	return kind == LO_SPIN || kind == LO_WRITE || kind == LO_MUTEX || kind == LO_RWSEM_WRITE;
}

static __always_inline int lo_side_is(struct lo_owner_side *s, struct lo_held_key *hk)
{
	return s->k.addr && s->id == hk->id && s->irq == hk->irq;
}

/* An exclusive acquisition seen taking its lock (taken: 1) or entering (0): the
 * owner where it took it or no one holds it, else the next. */
static __always_inline void lo_own(u64 addr, struct lo_held_key *hk, struct lo_held_lock *h,
				   int taken)
{
	struct lo_owner_side me = {};
	me.id = hk->id;
	me.irq = hk->irq;
	me.k.addr = addr;
	me.k.kind = h->kind;
	me.k.stack_id = h->stack_id;
	struct lo_owner none = {};
	struct lo_owner *o = lo_owners.lookup_or_try_init(&addr, &none);
	if (!o) {
		lo_count(LO_C_LOST_AGG_FULL);
		return;
	}
	if (!o->now.k.addr) {
		o->now = me;
		lo_count(taken ? LO_C_OWNERS_AT_WAIT_END : LO_C_OWNERS_AT_ENTRY);
		return;
	}
	if (lo_side_is(&o->now, hk))
		return;                 /* (taken again by its holder: a recursion) */
	if (!taken) {
		o->next = me;
		lo_count(LO_C_NEXT_AT_ENTRY);
		return;
	}
	lo_count(LO_C_OWNERS_AT_WAIT_END);
	o->now = me;
	if (lo_side_is(&o->next, hk))
		__builtin_memset(&o->next, 0, sizeof(o->next));
}

/* An exclusive hold ending (released, or its taking failed): the next holds it. */
static __always_inline void lo_disown(u64 addr, struct lo_held_key *hk)
{
	struct lo_owner *o = lo_owners.lookup(&addr);
	if (!o)
		return;
	if (lo_side_is(&o->now, hk)) {
		o->last = o->now;
		o->now = o->next;       /* (none where no one entered meanwhile) */
		__builtin_memset(&o->next, 0, sizeof(o->next));
		lo_count(o->now.k.addr ? LO_C_OWNERS_PROMOTED : LO_C_OWNERS_RELEASED);
	} else if (lo_side_is(&o->next, hk)) {
		o->last = o->next;      /* (its holder's release was never seen) */
		__builtin_memset(&o->now, 0, sizeof(o->now));
		__builtin_memset(&o->next, 0, sizeof(o->next));
		lo_count(LO_C_OWNERS_DROPPED);
	}
}

static __always_inline int lo_acquire(void *ctx, u64 addr, u32 kind, u32 variant, int kprobe)
{
	int push = lo_followed(kind);
	if (!lo_watched(addr))
		return 0;
	lo_count(LO_C_WATCHED);
	u32 context = lo_context(ctx, kprobe);
	struct lo_held_key hk = {};
	lo_held_key_of(&hk, context);
	int z = 0;
	struct lo_held *zero = lo_zero_held.lookup(&z);
	struct lo_held *held = zero ? lo_held_locks.lookup_or_try_init(&hk, zero) : NULL;
	if (!held) {
		lo_count(LO_C_LOST_HELD_FULL);
		return 0;
	}
	s32 sid = -1;
	u32 n = held->n;
	/* (a count, not a loop over the held locks: 6.1's verifier loses the bound of
	 * the loop below when the compiler lays out a second one beside it) */
	u32 softirqs = lo_softirqs(context, variant == LO_BH || held->bh_held);
	/* lockdep's read_lock_is_recursive() for queued rwlocks: in_interrupt() */
	if (kind == LO_READ && softirqs == KVMLP_IRQS_OFF)
		kind = LO_READ_RECURSIVE;
	struct lockorder_acq_key ak = {};
	ak.addr = addr;
	ak.kind = kind;
	ak.context = context;
	ak.irqs_at_call = kvmlp_irqs_at_call(ctx, kprobe);
	ak.irqs = lo_irqs(ak.irqs_at_call, variant);
	ak.softirqs = softirqs;
#pragma unroll
	for (int i = 0; i < LO_DEPTH; i++) {
		if (i >= n)
			continue;       /* not break: a trip count of n loses the bound (LO_DEPTH) */
		struct lo_held_lock *h = &held->l[i & (LO_DEPTH - 1)];
		if (h->addr == addr) {
			if (!lo_recursive_ok(kind, h->kind)) {
				if (sid < 0)
					sid = kvmlp_stackid(ctx);
				lo_recursion(h, addr, kind, sid, n, context);
			}
		} else {
			lo_edge(h, addr, kind, &sid, ctx);
		}
		ak.outer = h->addr;
	}
	struct lockorder_acq_val *av = lockorder_acqs.lookup(&ak);
	if (!av) {
		if (sid < 0)
			sid = kvmlp_stackid(ctx);
		struct lockorder_acq_val an = {};
		an.stack_id = sid;
		an.tgid = bpf_get_current_pid_tgid() >> 32;
		lockorder_acqs.insert(&ak, &an);
		av = lockorder_acqs.lookup(&ak);
	}
	if (av)
		kvmlp_add(&av->count, 1);
	else
		lo_count(LO_C_LOST_AGG_FULL);
	if (!push) {
		if (!n)
			lo_held_locks.delete(&hk);
		return 0;
	}
	if (n >= LO_DEPTH) {
		lo_count(LO_C_DEPTH_OVERFLOW);
		return 0;
	}
	u32 top = n;
	KVMLP_OPAQUE(top);
	struct lo_held_lock *h = &held->l[top & (LO_DEPTH - 1)];
	h->addr = addr;
	h->kind = kind;
	/* where this one was taken: its hold is kept by it (a held lock's walk, not
	 * only a new edge's or key's: klockstat's cost, for watched locks alone) */
	h->stack_id = sid >= 0 ? sid : kvmlp_stackid(ctx);
	h->ts_ns = bpf_ktime_get_ns();          /* (after our walk: not in its hold) */
	h->bh = variant == LO_BH;
	h->told = 0;
	held->bh_held += variant == LO_BH;
	held->n = n + 1;
	if (lo_exclusive(kind))
		lo_own(addr, &hk, h, 0);
	return 0;
}

/* The index of the innermost held entry of addr, or -1. */
static __always_inline int lo_innermost(struct lo_held *held, u64 addr)
{
	u32 n = held->n;
	int at = -1;
#pragma unroll
	for (int i = 0; i < LO_DEPTH; i++) {
		if (i < n && held->l[i & (LO_DEPTH - 1)].addr == addr)
			at = i;
	}
	return at;
}

/* Drops the innermost entry for addr (locks need not be released in order). */
static __always_inline int lo_release(void *ctx, u64 addr, int kprobe)
{
	u64 now = bpf_ktime_get_ns();   /* (before our lookups: not in the hold) */
	if (!lo_watched(addr))
		return 0;
	lo_count(LO_C_RELEASES);
	struct lo_held_key hk = {};
	lo_held_key_of(&hk, lo_context(ctx, kprobe));
	struct lo_held *held = lo_held_locks.lookup(&hk);
	if (!held) {
		lo_count(LO_C_UNMATCHED_RELEASES);
		return 0;
	}
	u32 n = held->n;
	int at = lo_innermost(held, addr);
	if (at < 0) {
		lo_count(LO_C_UNMATCHED_RELEASES);
		return 0;
	}
	KVMLP_OPAQUE(at);
	struct lo_held_lock *rel = &held->l[at & (LO_DEPTH - 1)];
	if (rel->kind != LO_SRCU_READ) {        /* (read sections: the srcu probe's) */
		struct lockorder_hold_key k = {};
		k.addr = addr;
		k.kind = rel->kind;
		k.stack_id = rel->stack_id;
		struct kvmlp_lat *zero = kvmlp_lat_zero();
		struct kvmlp_lat *v = zero ? lockorder_holds.lookup_or_try_init(&k, zero) : NULL;
		if (v)
			kvmlp_lat_add(v, now - rel->ts_ns);
		else
			lo_count(LO_C_LOST_AGG_FULL);
	}
	if (lo_exclusive(rel->kind))
		lo_disown(addr, &hk);
	if (rel->bh && held->bh_held)
		held->bh_held--;
#pragma unroll
	for (int i = 0; i < LO_DEPTH - 1; i++) {
		if (i >= at && i + 1 < n)
			held->l[i & (LO_DEPTH - 1)] = held->l[(i + 1) & (LO_DEPTH - 1)];
	}
	if (n <= 1)
		lo_held_locks.delete(&hk);
	else
		held->n = n - 1;
	return 0;
}

/* The top of a held stack when it is addr: the acquisition whose wait just ended
 * (its entry point pushed it before waiting), or NULL. */
static __always_inline struct lo_held_lock *lo_top(struct lo_held_key *k, u64 addr)
{
	struct lo_held *held = lo_held_locks.lookup(k);
	if (!held || held->n == 0 || held->n > LO_DEPTH)
		return NULL;
	u32 top = held->n - 1;
	KVMLP_OPAQUE(top);
	struct lo_held_lock *h = &held->l[top & (LO_DEPTH - 1)];
	return h->addr == addr ? h : NULL;
}

/* A followed lock whose wait ended: held from now, not from its entry point's call.
 * The CPU's interrupt stack first (non-empty only while an interrupt that took a lock
 * runs on it: a raw tracepoint cannot tell the context on x86), else the task's. */
RAW_TRACEPOINT_PROBE(contention_end)       /* (void *lock, int ret) */
{
	u64 now = bpf_ktime_get_ns();
	u64 addr = ctx->args[0];
	if (!lo_watched(addr))
		return 0;
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct lo_waiting *open = lo_waits.lookup(&tid);
	struct lo_wait *w = NULL;
	int inner = open && open->w[1].k.addr == addr;
	if (inner)
		w = &open->w[1];
	else if (open && open->w[0].k.addr == addr)
		w = &open->w[0];
	if (w) {
		struct lockorder_hold_key ck = w->k;
		u64 ns = now - w->ts_ns;
		if (inner)
			__builtin_memset(w, 0, sizeof(*w));
		else
			lo_waits.delete(&tid);
		struct lockorder_caused_val none = {};
		struct lockorder_caused_val *v = lockorder_caused.lookup_or_try_init(&ck, &none);
		if (v) {
			kvmlp_add(&v->count, 1);
			kvmlp_add(&v->total_ns, ns);
		} else {
			lo_count(LO_C_LOST_AGG_FULL);
		}
	}
	struct lo_held_key k = {};
	k.id = bpf_get_smp_processor_id();
	k.irq = 1;
	struct lo_held_lock *h = lo_top(&k, addr);
	if (!h) {
		k.id = tid;
		k.irq = 0;
		h = lo_top(&k, addr);
	}
	if (!h)
		return 0;
	h->ts_ns = now;
	if (!ctx->args[1] && lo_exclusive(h->kind))     /* (ret: a signal ended the wait) */
		lo_own(addr, &k, h, 1);
	return 0;
}

/* A wait on a followed lock begins: put down to its exclusive holder; a rwlock's only
 * while a writer holds it (its lock word read now: a writer that waits holds nothing),
 * to the last holder where its unlock has begun and not yet stored; else to the next
 * one where the waiter is the owner it saw (an owner no one saw taking it). Runs
 * before the contention probe's handler (sources.FIRST_ON_TRACEPOINTS). */
RAW_TRACEPOINT_PROBE(contention_begin)     /* (void *lock, unsigned int flags) */
{
	u64 now = bpf_ktime_get_ns();
	u64 addr = ctx->args[0];
	if (!lo_watched(addr))
		return 0;
	struct lo_held_key me = {};
	me.id = (u32)bpf_get_current_pid_tgid();
	struct lo_wait w = {};
	w.ts_ns = now;
	w.k.addr = addr;
	w.k.kind = LO_NO_HOLDER;
	w.k.stack_id = -1;
	u32 flags = ctx->args[1];
	int rw = (flags & LO_LCB_F_SPIN) && (flags & LO_LCB_F_RW) && !(flags & LO_LCB_F_RT);
	u32 cnts = LO_QW_LOCKED;
	if (rw)
		bpf_probe_read_kernel(&cnts, sizeof(cnts), (void *)addr);
	struct lo_owner *o = (cnts & 0xff) == LO_QW_LOCKED ? lo_owners.lookup(&addr) : NULL;
	if (o && o->now.k.addr && !lo_side_is(&o->now, &me)) {
		w.k = o->now.k;
		lo_count(LO_C_WAITS_UNDER_OWNER);
	} else if (o && rw && o->last.k.addr && !lo_side_is(&o->last, &me)) {
		w.k = o->last.k;        /* (write-held still: its unlock's store to come) */
		lo_count(LO_C_WAITS_UNDER_LAST);
	} else if (o && o->next.k.addr && !lo_side_is(&o->next, &me)) {
		w.k = o->next.k;
		lo_count(LO_C_WAITS_UNDER_NEXT);
	} else {
		lo_count(o ? LO_C_WAITS_SELF_OWNER : LO_C_WAITS_NO_HOLDER);
	}
	struct lo_waiting *open = lo_waits.lookup(&me.id);
	if (open && open->w[0].k.addr && open->w[0].k.addr != addr) {
		open->w[1] = w;         /* inside the open one, whose end is still to come */
	} else {
		struct lo_waiting one = {};
		one.w[0] = w;
		lo_waits.update(&me.id, &one);
	}
	return 0;
}

/* A killable or interruptible acquisition that returned an error (a signal) holds
 * nothing: its entry, the task's innermost (the wait takes no watched lock), comes
 * off. The watched lock such a call is taking, per task, from its entry to its
 * return (a kretprobe cannot read the argument). Sleeping locks: task context only. */
BPF_HASH(lo_may_fail, u32, u64, 4096);

static __always_inline int lo_acquire_may_fail(void *ctx, u64 addr, u32 kind, int kprobe)
{
	if (lo_watched(addr)) {
		u32 tid = (u32)bpf_get_current_pid_tgid();
		lo_may_fail.update(&tid, &addr);
	}
	return lo_acquire(ctx, addr, kind, LO_PLAIN, kprobe);
}

static __always_inline int lo_failed(s64 ret, u32 kind)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 *addr = lo_may_fail.lookup(&tid);
	if (!addr)
		return 0;               /* not a watched lock */
	u64 a = *addr;
	lo_may_fail.delete(&tid);
	if (!ret)
		return 0;
	struct lo_held_key hk = {};
	hk.id = tid;
	struct lo_held *held = lo_held_locks.lookup(&hk);
	if (!held)
		return 0;
	u32 n = held->n;
	if (n == 0 || n > LO_DEPTH)
		return 0;
	u32 top = n - 1;
	KVMLP_OPAQUE(top);
	struct lo_held_lock *h = &held->l[top & (LO_DEPTH - 1)];
	if (h->addr != a || h->kind != kind)
		return 0;
	lo_count(LO_C_FAILED_ACQUISITIONS);
	if (lo_exclusive(kind))
		lo_disown(a, &hk);
	if (n <= 1)
		lo_held_locks.delete(&hk);
	else
		held->n = n - 1;
	return 0;
}

static __always_inline int lo_srcu_at(void *ctx, u32 fn, int kprobe)
{
	struct lockorder_at_key k = {};
	k.fn = fn;
	k.context = lo_context(ctx, kprobe);
	struct lo_held_key hk = {};
	lo_held_key_of(&hk, k.context);
	struct lo_held *held = lo_held_locks.lookup(&hk);
	if (held) {
		u32 n = held->n;
#pragma unroll
		for (int i = 0; i < LO_DEPTH; i++) {
			if (i < n && held->l[i & (LO_DEPTH - 1)].kind == LO_SRCU_READ)
				k.ssp = held->l[i & (LO_DEPTH - 1)].addr;
		}
	}
	struct lockorder_acq_val *v = lockorder_srcu_at.lookup(&k);
	if (!v) {
		struct lockorder_acq_val n = {};
		n.stack_id = kvmlp_stackid(ctx);
		n.tgid = bpf_get_current_pid_tgid() >> 32;
		lockorder_srcu_at.insert(&k, &n);
		v = lockorder_srcu_at.lookup(&k);
	}
	if (v)
		kvmlp_add(&v->count, 1);
	else
		lo_count(LO_C_LOST_AGG_FULL);
	return 0;
}

/* --- the entry points ----------------------------------------------------------- */

#define LO_KPROBE(key) (KVMLP_M_##key == KVMLP_M_KPROBE)
#define LO_ACQ(key, param, kind, variant) \
	KVMLP_ENTRY(key) \
	{ return lo_acquire(ctx, KVMLP_ARG(key, param), kind, variant, LO_KPROBE(key)); }
#define LO_ACQ_MF(key, param, kind) \
	KVMLP_ENTRY(key) \
	{ return lo_acquire_may_fail(ctx, KVMLP_ARG(key, param), kind, LO_KPROBE(key)); }
#define LO_REL(key, param) \
	KVMLP_ENTRY(key) \
	{ return lo_release(ctx, KVMLP_ARG(key, param), LO_KPROBE(key)); }

/* Keys (the kernel keeps 15 characters of a program's name): L lock, U unlock;
 * S spin, R read, W write (rwlock), M mutex, D/E rwsem read/write, C SRCU read,
 * Y synchronize_srcu;
 * then B _bh, I _irq, F _irqsave/_irqrestore, T _interruptible, K _killable,
 * E _expedited, N _nested (lockdep kernels' entry points).
 * The symbols are in kvmlockprof/probes/lockorder.py. */
LO_ACQ(LOLS, LOCK, LO_SPIN, LO_PLAIN)
LO_ACQ(LOLSB, LOCK, LO_SPIN, LO_BH)
LO_ACQ(LOLSI, LOCK, LO_SPIN, LO_IRQ)
LO_ACQ(LOLSF, LOCK, LO_SPIN, LO_IRQ)
LO_REL(LOUS, LOCK)
LO_REL(LOUSB, LOCK)
LO_REL(LOUSI, LOCK)
LO_REL(LOUSF, LOCK)
LO_ACQ(LOLR, LOCK, LO_READ, LO_PLAIN)
LO_ACQ(LOLRB, LOCK, LO_READ, LO_BH)
LO_ACQ(LOLRI, LOCK, LO_READ, LO_IRQ)
LO_ACQ(LOLRF, LOCK, LO_READ, LO_IRQ)
LO_REL(LOUR, LOCK)
LO_REL(LOURB, LOCK)
LO_REL(LOURI, LOCK)
LO_REL(LOURF, LOCK)
LO_ACQ(LOLW, LOCK, LO_WRITE, LO_PLAIN)
LO_ACQ(LOLWB, LOCK, LO_WRITE, LO_BH)
LO_ACQ(LOLWI, LOCK, LO_WRITE, LO_IRQ)
LO_ACQ(LOLWF, LOCK, LO_WRITE, LO_IRQ)
LO_REL(LOUW, LOCK)
LO_REL(LOUWB, LOCK)
LO_REL(LOUWI, LOCK)
LO_REL(LOUWF, LOCK)
LO_ACQ(LOLM, LOCK, LO_MUTEX, LO_PLAIN)
LO_ACQ_MF(LOLMT, LOCK, LO_MUTEX)
LO_ACQ_MF(LOLMK, LOCK, LO_MUTEX)
LO_REL(LOUM, LOCK)
LO_ACQ(LOLD, SEM, LO_RWSEM_READ, LO_PLAIN)
LO_ACQ_MF(LOLDK, SEM, LO_RWSEM_READ)
LO_ACQ(LOLE, SEM, LO_RWSEM_WRITE, LO_PLAIN)
LO_ACQ_MF(LOLEK, SEM, LO_RWSEM_WRITE)
LO_REL(LOUD, SEM)
LO_REL(LOUE, SEM)
LO_ACQ(LOLC, SSP, LO_SRCU_READ, LO_PLAIN)
LO_REL(LOUC, SSP)
LO_ACQ(LOLSN, LOCK, LO_SPIN, LO_PLAIN)
LO_ACQ(LOLSFN, LOCK, LO_SPIN, LO_IRQ)
LO_ACQ(LOLMN, LOCK, LO_MUTEX, LO_PLAIN)
LO_ACQ_MF(LOLMTN, LOCK, LO_MUTEX)
LO_ACQ_MF(LOLMKN, LOCK, LO_MUTEX)
LO_ACQ(LOLDN, SEM, LO_RWSEM_READ, LO_PLAIN)
LO_ACQ_MF(LOLDKN, SEM, LO_RWSEM_READ)
LO_ACQ(LOLEN, SEM, LO_RWSEM_WRITE, LO_PLAIN)
LO_ACQ_MF(LOLEKN, SEM, LO_RWSEM_WRITE)
LO_ACQ(LOLY, SSP, LO_SRCU_SYNC, LO_PLAIN)
LO_ACQ(LOLYE, SSP, LO_SRCU_SYNC, LO_PLAIN)

#define LO_FAIL(key, kind) \
	KVMLP_RETURN(key) \
	{ return lo_failed((s64)KVMLP_RET(key), kind); }
LO_FAIL(LOLMT, LO_MUTEX)
LO_FAIL(LOLMK, LO_MUTEX)
LO_FAIL(LOLMTN, LO_MUTEX)
LO_FAIL(LOLMKN, LO_MUTEX)
LO_FAIL(LOLDK, LO_RWSEM_READ)
LO_FAIL(LOLDKN, LO_RWSEM_READ)
LO_FAIL(LOLEK, LO_RWSEM_WRITE)
LO_FAIL(LOLEKN, LO_RWSEM_WRITE)

#define LO_AT(key, slot) \
	KVMLP_ENTRY(key) \
	{ return lo_srcu_at(ctx, slot, LO_KPROBE(key)); }
LO_AT(LOAT0, 0)
LO_AT(LOAT1, 1)
LO_AT(LOAT2, 2)
LO_AT(LOAT3, 3)

/* The objects: a VM at its first VM ioctl, a vCPU at its first vCPU ioctl (before
 * the locks those ioctls take). */
KVMLP_ENTRY(LOVM)
{
	u64 filp = KVMLP_ARG(LOVM, FILP);
	lo_watch(kvmlp_read_u64(filp, KVMLP_OFF_LO_FILE_PRIVATE_DATA), KVMLP_LO_KVM_SIZE,
		 LO_OBJ_KVM);
	return 0;
}

KVMLP_ENTRY(LOVC)
{
	u64 filp = KVMLP_ARG(LOVC, FILP);
	u64 vcpu = kvmlp_read_u64(filp, KVMLP_OFF_LO_FILE_PRIVATE_DATA);
	lo_watch(vcpu, KVMLP_LO_VCPU_SIZE, LO_OBJ_VCPU);
	lo_watch(kvmlp_read_u64(vcpu, KVMLP_OFF_LO_VCPU_KVM), KVMLP_LO_KVM_SIZE, LO_OBJ_KVM);
	return 0;
}
