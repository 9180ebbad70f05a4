/* gpc: gfn_to_pfn_cache refresh latency and result (streamed), check results
 * and activate/deactivate (aggregated per cache). A cache is named by its
 * place where BTF gives the offset: the candidate container's kvm pointer must
 * equal gpc->kvm for the place to count. */

enum gpc_place {
	GPC_UNKNOWN, GPC_XEN_SHINFO, GPC_PV_TIME, GPC_XEN_VCPU_INFO, GPC_XEN_VCPU_TIME,
	GPC_XEN_RUNSTATE, GPC_XEN_RUNSTATE2,
};
enum gpc_op { GPC_CHECK_MISS, GPC_CHECK_HIT, GPC_ACTIVATE, GPC_DEACTIVATE };
enum gpc_counter {
	GPC_C_REFRESHES, GPC_C_CHECKS, GPC_C_LOST_RINGBUF_FULL, GPC_C_LOST_PENDING_FULL,
	GPC_C_LOST_AGG_FULL,
};

struct kvmlp_gpc_event {
	u64 ts_ns;
	u64 lat_ns;
	u64 gpc;
	u64 kvm;
	u64 gpa;
	s32 ret;
	u32 place;
	u32 tid;
	u32 tgid;
};

struct kvmlp_gpc_key {
	u64 gpc;
	u64 kvm;
	u32 place;
	u32 op;
	u32 tgid;
	u32 pad;
};

struct kvmlp_gpc_val {
	u64 count;
};

BPF_RINGBUF_OUTPUT(gpc_events, KVMLP_RINGBUF_PAGES);
BPF_HASH(gpc_ops, struct kvmlp_gpc_key, struct kvmlp_gpc_val, 4096);
#define gpc_count(i) kvmlp_count(KVMLP_CBASE_GPC + (i))

/* gpc->kvm, or (6.1, before caches knew their VM) gpc->vcpu->kvm. */
static __always_inline u64 gpc_kvm(u64 gpc)
{
	if (KVMLP_OFF_GPC_KVM >= 0)
		return kvmlp_read_u64(gpc, KVMLP_OFF_GPC_KVM);
	return kvmlp_read_u64(kvmlp_read_u64(gpc, KVMLP_OFF_GPC_VCPU), KVMLP_OFF_VCPU_KVM);
}

static __always_inline int gpc_vcpu_place(u64 gpc, u64 kvm, int off)
{
	if (off < 0)
		return 0;
	return kvmlp_read_u64(gpc - off, KVMLP_OFF_VCPU_KVM) == kvm;
}

static __always_inline u32 gpc_place(u64 gpc, u64 kvm)
{
	if (!kvm)
		return GPC_UNKNOWN;
	if (KVMLP_OFF_XEN_SHINFO >= 0 && gpc - KVMLP_OFF_XEN_SHINFO == kvm)
		return GPC_XEN_SHINFO;
	if (gpc_vcpu_place(gpc, kvm, KVMLP_OFF_PV_TIME))
		return GPC_PV_TIME;
	if (gpc_vcpu_place(gpc, kvm, KVMLP_OFF_XEN_VCPU_INFO))
		return GPC_XEN_VCPU_INFO;
	if (gpc_vcpu_place(gpc, kvm, KVMLP_OFF_XEN_VCPU_TIME))
		return GPC_XEN_VCPU_TIME;
	if (gpc_vcpu_place(gpc, kvm, KVMLP_OFF_XEN_RUNSTATE))
		return GPC_XEN_RUNSTATE;
	if (gpc_vcpu_place(gpc, kvm, KVMLP_OFF_XEN_RUNSTATE2))
		return GPC_XEN_RUNSTATE2;
	return GPC_UNKNOWN;
}

static __always_inline int gpc_op(u64 gpc, u32 op)
{
	struct kvmlp_gpc_key k = {};
	k.gpc = gpc;
	k.kvm = gpc_kvm(gpc);
	k.place = gpc_place(gpc, k.kvm);
	k.op = op;
	k.tgid = bpf_get_current_pid_tgid() >> 32;
	kvmlp_note_vm(k.kvm);
	struct kvmlp_gpc_val zero = {};
	struct kvmlp_gpc_val *v = gpc_ops.lookup_or_try_init(&k, &zero);
	if (v)
		kvmlp_add(&v->count, 1);
	else
		gpc_count(GPC_C_LOST_AGG_FULL);
	return 0;
}

KVMLP_ENTRY(GPC_REFRESH)
{
	if (kvmlp_call_enter(KVMLP_FN_GPC_REFRESH, KVMLP_ARG(GPC_REFRESH, GPC), 0))
		gpc_count(GPC_C_LOST_PENDING_FULL);
	return 0;
}

KVMLP_RETURN(GPC_REFRESH)
{
	struct kvmlp_call c;
	if (!kvmlp_call_exit(KVMLP_FN_GPC_REFRESH, &c))
		return 0;
	gpc_count(GPC_C_REFRESHES);
	struct kvmlp_gpc_event *e = gpc_events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		gpc_count(GPC_C_LOST_RINGBUF_FULL);
		return 0;
	}
	u64 id = bpf_get_current_pid_tgid();
	e->ts_ns = bpf_ktime_get_ns();
	e->lat_ns = e->ts_ns - c.ts_ns;
	e->gpc = c.a0;
	e->kvm = gpc_kvm(c.a0);
	e->gpa = kvmlp_read_u64(c.a0, KVMLP_OFF_GPC_GPA);
	e->ret = (s32)KVMLP_RET(GPC_REFRESH);
	e->place = gpc_place(c.a0, e->kvm);
	e->tid = (u32)id;
	e->tgid = id >> 32;
	kvmlp_note_vm(e->kvm);
	gpc_events.ringbuf_submit(e, 0);
	return 0;
}

KVMLP_ENTRY(GPC_CHECK)
{
	if (kvmlp_call_enter(KVMLP_FN_GPC_CHECK, KVMLP_ARG(GPC_CHECK, GPC), 0))
		gpc_count(GPC_C_LOST_PENDING_FULL);
	return 0;
}

KVMLP_RETURN(GPC_CHECK)
{
	struct kvmlp_call c;
	if (!kvmlp_call_exit(KVMLP_FN_GPC_CHECK, &c))
		return 0;
	gpc_count(GPC_C_CHECKS);
	return gpc_op(c.a0, (u8)KVMLP_RET(GPC_CHECK) ? GPC_CHECK_HIT : GPC_CHECK_MISS);
}

KVMLP_ENTRY(GPC_ACTIVATE)
{
	return gpc_op(KVMLP_ARG(GPC_ACTIVATE, GPC), GPC_ACTIVATE);
}

KVMLP_ENTRY(GPC_DEACTIVATE)
{
	return gpc_op(KVMLP_ARG(GPC_DEACTIVATE, GPC), GPC_DEACTIVATE);
}
