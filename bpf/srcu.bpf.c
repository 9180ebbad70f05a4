/* srcu: read sections (__srcu_read_lock .. __srcu_read_unlock, paired per
 * thread and srcu_struct, nesting counted) aggregated in the kernel per
 * srcu_struct; one section in KVMLP_SRCU_SAMPLE_EVERY is streamed. Grace-period
 * waits in synchronize_srcu{,_expedited} are streamed with their stack.
 * kvm->srcu / kvm->irq_srcu are told apart by their offset in a known VM. */

enum srcu_kind { SRCU_OTHER, SRCU_KVM, SRCU_KVM_IRQ };
enum srcu_event_type { SRCU_EV_SECTION, SRCU_EV_SYNC, SRCU_EV_SYNC_EXP };
enum srcu_counter {
	SRCU_C_READ_LOCKS, SRCU_C_READ_UNLOCKS, SRCU_C_UNPAIRED_UNLOCKS, SRCU_C_SYNCS,
	SRCU_C_LOST_RINGBUF_FULL, SRCU_C_LOST_PENDING_FULL, SRCU_C_LOST_AGG_FULL,
};

struct srcu_reader_key {
	u32 tid;
	u32 pad;
	u64 ssp;
};

struct srcu_reader {
	u64 start_ns;
	u32 depth;
	u32 pad;
};

struct kvmlp_srcu_key {
	u64 ssp;
	u64 kvm;
	u32 kind;
	u32 pad;
};

struct kvmlp_srcu_event {
	u64 ts_ns;
	u64 dur_ns;
	u64 ssp;
	u64 kvm;
	u32 kind;
	u32 type;       /* enum srcu_event_type */
	u32 tid;
	u32 tgid;
	s32 stack_id;
	u32 pad;
};

BPF_HASH(srcu_readers, struct srcu_reader_key, struct srcu_reader, 16384);
BPF_HASH(srcu_sections, struct kvmlp_srcu_key, struct kvmlp_lat, 4096);
BPF_RINGBUF_OUTPUT(srcu_events, KVMLP_RINGBUF_PAGES);
#define srcu_count(i) kvmlp_count(KVMLP_CBASE_SRCU + (i))
BPF_PERCPU_ARRAY(srcu_tick, u64, 1);

static __always_inline u64 srcu_kvm(u64 ssp, u32 *kind)
{
	u64 kvm = kvmlp_vm_of(ssp, KVMLP_OFF_KVM_SRCU);
	*kind = kvm ? SRCU_KVM : SRCU_OTHER;
	if (!kvm) {
		kvm = kvmlp_vm_of(ssp, KVMLP_OFF_KVM_IRQ_SRCU);
		*kind = kvm ? SRCU_KVM_IRQ : SRCU_OTHER;
	}
	return kvm;
}

static __always_inline void srcu_emit(u64 now, u64 dur, u64 ssp, u32 type, s32 stack_id)
{
	struct kvmlp_srcu_event *e = srcu_events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		srcu_count(SRCU_C_LOST_RINGBUF_FULL);
		return;
	}
	u64 id = bpf_get_current_pid_tgid();
	e->ts_ns = now;
	e->dur_ns = dur;
	e->ssp = ssp;
	e->kvm = srcu_kvm(ssp, &e->kind);
	e->type = type;
	e->tid = (u32)id;
	e->tgid = id >> 32;
	e->stack_id = stack_id;
	srcu_events.ringbuf_submit(e, 0);
}

KVMLP_ENTRY(SRCU_LOCK)
{
	struct srcu_reader_key k = {};
	k.tid = (u32)bpf_get_current_pid_tgid();
	k.ssp = KVMLP_ARG(SRCU_LOCK, SSP);
	srcu_count(SRCU_C_READ_LOCKS);
	struct srcu_reader *r = srcu_readers.lookup(&k);
	if (r) {
		r->depth++;     /* nested: the outermost section is the one measured */
		return 0;
	}
	struct srcu_reader n = {};
	n.start_ns = bpf_ktime_get_ns();
	n.depth = 1;
	if (srcu_readers.update(&k, &n))
		srcu_count(SRCU_C_LOST_PENDING_FULL);
	return 0;
}

KVMLP_ENTRY(SRCU_UNLOCK)
{
	struct srcu_reader_key k = {};
	k.tid = (u32)bpf_get_current_pid_tgid();
	k.ssp = KVMLP_ARG(SRCU_UNLOCK, SSP);
	srcu_count(SRCU_C_READ_UNLOCKS);
	struct srcu_reader *r = srcu_readers.lookup(&k);
	if (!r) {
		srcu_count(SRCU_C_UNPAIRED_UNLOCKS);   /* locked before we attached,
							       * or in another task */
		return 0;
	}
	if (--r->depth)
		return 0;
	u64 now = bpf_ktime_get_ns();
	u64 dur = now - r->start_ns;
	srcu_readers.delete(&k);

	struct kvmlp_srcu_key ak = {};
	ak.ssp = k.ssp;
	ak.kvm = srcu_kvm(k.ssp, &ak.kind);
	struct kvmlp_lat *zero = kvmlp_lat_zero();
	struct kvmlp_lat *v = zero ? srcu_sections.lookup_or_try_init(&ak, zero) : NULL;
	if (v)
		kvmlp_lat_add(v, dur);
	else
		srcu_count(SRCU_C_LOST_AGG_FULL);
#if KVMLP_SRCU_SAMPLE_EVERY > 0
	int zero_idx = 0;
	u64 *tick = srcu_tick.lookup(&zero_idx);
	if (tick && (*tick)++ % KVMLP_SRCU_SAMPLE_EVERY == 0)
		srcu_emit(now, dur, k.ssp, SRCU_EV_SECTION, -1);
#endif
	return 0;
}

static __always_inline int srcu_sync_enter(void *ctx, u32 fn, u64 ssp)
{
	u64 stack = (u32)kvmlp_stackid(ctx);
	if (kvmlp_call_enter(fn, ssp, stack))
		srcu_count(SRCU_C_LOST_PENDING_FULL);
	return 0;
}

static __always_inline int srcu_sync_exit(u32 fn, u32 type)
{
	struct kvmlp_call c;
	if (!kvmlp_call_exit(fn, &c))
		return 0;
	srcu_count(SRCU_C_SYNCS);
	u64 now = bpf_ktime_get_ns();
	srcu_emit(now, now - c.ts_ns, c.a0, type, (s32)c.a1);
	return 0;
}

KVMLP_ENTRY(SYNC)
{
	return srcu_sync_enter(ctx, KVMLP_FN_SYNC, KVMLP_ARG(SYNC, SSP));
}

KVMLP_RETURN(SYNC)
{
	return srcu_sync_exit(KVMLP_FN_SYNC, SRCU_EV_SYNC);
}

KVMLP_ENTRY(SYNC_EXP)
{
	return srcu_sync_enter(ctx, KVMLP_FN_SYNC_EXP, KVMLP_ARG(SYNC_EXP, SSP));
}

KVMLP_RETURN(SYNC_EXP)
{
	return srcu_sync_exit(KVMLP_FN_SYNC_EXP, SRCU_EV_SYNC_EXP);
}
