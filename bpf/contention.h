/* Shared by the BPF side (contention.bpf.c) and the Python side, which takes
 * these layouts from bcc's view of this header (table.Key/Leaf, table.event()),
 * never from a restatement. */
#ifndef KLP_CONTENTION_H
#define KLP_CONTENTION_H

#include "kmaps.h"         /* KLP_HIST_SLOTS and the bucket rule */

#define KLP_COMM_LEN 16

/* Indexes of the in-kernel counters: every event seen, and every one lost. */
enum klp_counter {
	KLP_C_BEGIN,            /* contention_begin that passed the filter */
	KLP_C_END,              /* contention_end that passed the filter */
	KLP_C_END_NO_BEGIN,     /* an end whose begin we never saw (attached mid-wait) */
	KLP_C_PENDING_FULL,     /* lost: a wait in progress dropped (its task's slots full) */
	KLP_C_AGG_FULL,         /* lost: a wait not aggregated, the aggregate map was full */
	KLP_C_RINGBUF_FULL,     /* lost: a sample not streamed, the ring buffer was full */
	KLP_C_STACK_FAIL,       /* a wait whose kernel stack could not be stored */
	KLP_C_SAMPLED,          /* samples handed to the ring buffer */
	KLP_C_BEGIN_NO_END,     /* a begin on a lock whose previous wait's end was missed */
	KLP_C_FIRST_WALK,       /* stacks walked at the end of a lock's first unwalked wait */
	KLP_C_FILTER_FULL,      /* lost: a forked task not followed, tgid_filter was full */
	KLP_C_FILTER_EXITS,     /* threads that left tgid_filter when they exited */
	KLP_NR_COUNTERS,
};

/* stack_id of a wait whose stack was not walked (--stack-every, --stack-budget). */
#define KLP_NO_STACK (-1000)

/* One completed contended wait, as streamed through the ring buffer. */
struct klp_contention_event {
	u64 ts_ns;              /* bpf_ktime_get_ns() at contention_end */
	u64 wait_ns;            /* from the top of its first begin's handler to the top of this one's */
	u64 lock_addr;
	u32 tid;
	u32 tgid;
	u32 flags;              /* LCB_F_* of the last contention_begin */
	s32 stack_id;           /* < 0: no stack (KLP_C_STACK_FAIL, or KLP_NO_STACK) */
	u32 cpu;
	s32 ret;                /* contention_end's ret: 0, or -EINTR etc. for killable waits */
	char comm[KLP_COMM_LEN];
};

/* In-kernel aggregate, one per (lock, flags, stack, process), shared by all CPUs. */
struct klp_agg_key {
	u64 lock_addr;
	u32 tgid;
	u32 flags;
	s32 stack_id;
	u32 pad;
};

struct klp_agg_val {
	u64 count;
	u64 total_ns;
	u64 max_ns;
	u64 min_ns;
	u64 hist[KLP_HIST_SLOTS];
};

#endif
