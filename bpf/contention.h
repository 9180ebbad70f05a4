/* Shared by the BPF side (contention.bpf.c) and the Python side, which takes
 * these layouts from bcc's view of this header (table.Key/Leaf, table.event()) and
 * its enums and #defines from kvmlockprof/cdefs.py, never from a restatement. */
#ifndef KVMLP_CONTENTION_H
#define KVMLP_CONTENTION_H

#include "kmaps.h"         /* KVMLP_HIST_SLOTS and the bucket rule */

#define KVMLP_COMM_LEN 16

/* Indexes of the in-kernel counters: every event seen, and every one lost. */
enum contention_counter {
	KVMLP_C_BEGIN,              /* contention_begin that passed the filter */
	KVMLP_C_END,                /* contention_end that passed the filter */
	KVMLP_C_END_WITHOUT_BEGIN,  /* an end whose begin we never saw (attached mid-wait) */
	KVMLP_C_LOST_PENDING_FULL,  /* lost: a wait in progress dropped (its task's slots full) */
	KVMLP_C_LOST_AGG_FULL,      /* lost: a wait not aggregated, the aggregate map was full */
	KVMLP_C_LOST_RINGBUF_FULL,  /* lost: a sample not streamed, the ring buffer was full */
	KVMLP_C_STACK_FAILURES,     /* a wait whose kernel stack could not be stored */
	KVMLP_C_SAMPLED,            /* samples handed to the ring buffer */
	KVMLP_C_BEGIN_WITHOUT_END,  /* a begin that found an earlier wait's end missed (its lock's, or
				     * an interrupt's open at its level) */
	KVMLP_C_FIRST_WALKS,        /* stacks walked at the end of a lock's first unwalked wait */
	KVMLP_C_LOST_FILTER_FULL,   /* lost: a forked task not followed, tgid_filter was full */
	KVMLP_C_FILTER_EXITS,       /* threads that left tgid_filter when they exited */
	KVMLP_C_FILTERED,           /* contention_begin of a followed process dropped by --tid/-G/-L/-Y */
	KVMLP_C_FILTERED_END,       /* waits dropped at their end by -Y (a mutex's final type) */
	KVMLP_C_LOST_VCPU_FULL,     /* lost: a vCPU window not kept or aggregated, its map was full */
	KVMLP_C_NESTED,             /* waits that began inside another wait of their task (a
	                             * mutex's wait_lock, an interrupt over a waiting task) */
	KVMLP_C_IRQ_WAITS,          /* waits in interrupt context (kept apart from the task's) */
	KVMLP_C_BEGIN_UNDER_END,    /* begins while this CPU ran our end handler: not kept (their
	                             * end comes under it too, where the kernel skips that handler) */
	KVMLP_NR_COUNTERS,
};

/* lock:contention_begin's flags, as the kernel's include/trace/events/lock.h defines
 * them (no header bcc includes has them). */
#define KVMLP_LCB_F_SPIN (1U << 0)
#define KVMLP_LCB_F_READ (1U << 1)
#define KVMLP_LCB_F_WRITE (1U << 2)
#define KVMLP_LCB_F_RT (1U << 3)
#define KVMLP_LCB_F_PERCPU (1U << 4)
#define KVMLP_LCB_F_MUTEX (1U << 5)

/* -Y's table: one entry per LCB_F_* flags value (include/trace/events/lock.h has 6 bits),
 * its bits: a wait ending with these flags is kept / a begin with them may start one. */
#define KVMLP_TYPE_SLOTS 64
#define KVMLP_TYPE_END 1
#define KVMLP_TYPE_BEGIN 2

/* stack_id of a wait whose stack was not walked (--stack-every, --stack-budget). */
#define KVMLP_NO_STACK (-1000)

/* One completed contended wait, as streamed through the ring buffer. */
struct kvmlp_contention_event {
	u64 ts_ns;              /* bpf_ktime_get_ns() at contention_end */
	u64 wait_ns;            /* from the top of its first begin's handler to the top of this one's */
	u64 lock_addr;
	u32 tid;
	u32 tgid;
	u32 flags;              /* LCB_F_* of the last contention_begin */
	s32 stack_id;           /* < 0: no stack (KVMLP_C_STACK_FAILURES, or KVMLP_NO_STACK) */
	u32 cpu;
	s32 ret;                /* contention_end's ret: 0, or -EINTR etc. for killable waits */
	char comm[KVMLP_COMM_LEN];
};

/* In-kernel aggregate, one per (lock, flags, stack, process), shared by all CPUs. */
struct kvmlp_agg_key {
	u64 lock_addr;
	u32 tgid;
	u32 flags;
	s32 stack_id;
	u32 pad;
};

struct kvmlp_agg_val {
	u64 count;
	u64 total_ns;
	u64 max_ns;
	u64 min_ns;
	u64 hist[KVMLP_HIST_SLOTS];
};

/* The nested waits, by lock and process: their time lies inside an outer wait of
 * the same task, so it is in the aggregates (every wait, as perf counts them) but
 * not added to a process's or a vCPU's total. */
struct kvmlp_nested_key {
	u64 lock_addr;
	u32 tgid;
	u32 irq;                /* 1: the nested wait ran in an interrupt */
};

struct kvmlp_nested_val {
	u64 count;
	u64 total_ns;
};

/* --lock-owner: a sleeping lock and the thread that held it as a wait began. */
struct kvmlp_owner_key {
	u64 lock_addr;
	u32 owner;              /* its tid */
	u32 pad;
};

struct kvmlp_owner_val {
	u64 count;
	u64 total_ns;
};

#define KVMLP_PF_KTHREAD 0x00200000     /* task_struct.flags: include/linux/sched.h */

/* What a lock is, where the waiter itself tells (lock_kinds): looked at once per
 * aggregate key, when it is made, never per wait. */
enum kvmlp_lock_kind {
	KVMLP_LOCK_MM = 1,          /* the waiter's own mm->mmap_lock; id: its tgid */
	KVMLP_LOCK_STACK,           /* on the waiter's own kernel stack; id: its tid */
	KVMLP_LOCK_ZONE,            /* a struct zone's lock; id: node << 16 | the zone's
				     * byte offset in its node's node_zones */
	KVMLP_LOCK_MM_WAIT_LOCK,    /* the waiter's own mm->mmap_lock.wait_lock; id: its tgid */
	KVMLP_LOCK_FUTEX,           /* a bucket's lock in the waiter's own process's private
				     * futex hash (mm->futex_phash, 6.16+); id: its tgid */
};

struct kvmlp_lock_kind_val {
	u32 kind;
	u32 id;
	s32 stack_id;           /* the telling wait's stack: its caller names an on-stack lock */
	u32 pad;
};

/* --lock-owner's owner stacks (owner_stack): per lock, owner thread and stack (a hash
 * of its frames), the wait begins that found the owner asleep there. */
#define KVMLP_OWNER_DEPTH 16
struct kvmlp_owner_stack_key {
	u64 lock_addr;
	u32 owner;              /* its tid */
	u32 hash;               /* of ips */
};

struct kvmlp_owner_stack_val {
	u64 count;
	u64 ips[KVMLP_OWNER_DEPTH];
};

/* Slab names (slab_caches): user space asks for up to KVMLP_SLAB_BATCH lock
 * addresses at a time, each answered in place by its slab cache's name ("" where the
 * address is in no slab object). The longest cache name here is 23 characters. */
#define KVMLP_SLAB_BATCH 64
#define KVMLP_SLAB_NAME 40
struct kvmlp_slab_query {
	u64 addr;
	char cache[KVMLP_SLAB_NAME];
};

/* --vcpu-exits: where a vCPU thread's waits fall. A window is one exit's handling
 * (kvm:kvm_exit to kvm:kvm_entry) or one KVM_RUN (the ioctl's entry to
 * kvm:kvm_userspace_exit, guest time included): the first where the kernel fires
 * kvm_exit, the second everywhere. */
enum kvmlp_basis {
	KVMLP_BASIS_EXIT = 1,
	KVMLP_BASIS_RUN = 2,
};
/* The reason of a KVM_RUN window's waits: only known when the run ends. */
#define KVMLP_REASON_ANY 0xffffffff
/* A KVM_RUN that returned an error: this bit and -errno (kvm_userspace_exit's). */
#define KVMLP_REASON_ERRNO 0x80000000

/* Per thread and window kind, reason (kvm_exit's exit_reason and isa, or
 * kvm_userspace_exit's reason, isa 0): windows, their time, the waits inside. */
struct kvmlp_exit_key {
	u32 tgid;
	u32 tid;
	u32 basis;
	u32 isa;
	u32 reason;
	u32 vcpu_id;            /* kvm_exit's; ~0 for KVM_RUN windows */
};

struct kvmlp_exit_val {
	u64 count;
	u64 time_ns;
	u64 wait_ns;
	u64 waits;
};

/* The same waits by lock: per exit reason, or KVMLP_REASON_ANY for KVM_RUN. */
struct kvmlp_exit_wait_key {
	u64 lock_addr;
	u32 tgid;
	u32 tid;
	u32 basis;
	u32 isa;
	u32 reason;
	u32 flags;
};

struct kvmlp_exit_wait_val {
	u64 count;
	u64 wait_ns;
};

#endif
