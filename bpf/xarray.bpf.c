/* xarray: xa_erase(xa, index) latency and caller for every erase (in-kernel
 * aggregate per xarray, owner and stack); KVM-owned erases are also streamed.
 * An xarray is KVM's when it sits at a known field of a known VM. */

enum xa_owner { XA_OTHER, XA_KVM_VCPU_ARRAY, XA_KVM_LPI, XA_KVM_VCPU_ARRAY_BY_CALLER };
enum xarray_counter {
	XA_C_ERASES, XA_C_KVM_ERASES, XA_C_LOST_RINGBUF_FULL, XA_C_LOST_PENDING_FULL,
	XA_C_LOST_AGG_FULL, XA_C_VCPU_DESTROYS,
};

struct kvmlp_xa_event {
	u64 ts_ns;
	u64 lat_ns;
	u64 xa;
	u64 kvm;
	u32 owner;
	s32 stack_id;
	u32 tid;
	u32 tgid;
};

struct kvmlp_xa_key {
	u64 xa;
	u64 kvm;
	u32 owner;
	s32 stack_id;
};

BPF_RINGBUF_OUTPUT(xa_events, KVMLP_RINGBUF_PAGES);
BPF_HASH(xa_agg, struct kvmlp_xa_key, struct kvmlp_lat, 8192);
#define xa_count(i) kvmlp_count(KVMLP_CBASE_XARRAY + (i))

static __always_inline void xa_emit(u64 now, u64 lat, struct kvmlp_xa_key *k)
{
	xa_count(XA_C_KVM_ERASES);
	struct kvmlp_xa_event *e = xa_events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		xa_count(XA_C_LOST_RINGBUF_FULL);
		return;
	}
	u64 id = bpf_get_current_pid_tgid();
	e->ts_ns = now;
	e->lat_ns = lat;
	e->xa = k->xa;
	e->kvm = k->kvm;
	e->owner = k->owner;
	e->stack_id = k->stack_id;
	e->tid = (u32)id;
	e->tgid = id >> 32;
	xa_events.ringbuf_submit(e, 0);
}

static __always_inline void xa_account(struct kvmlp_xa_key *k, u64 lat)
{
	struct kvmlp_lat *zero = kvmlp_lat_zero();
	struct kvmlp_lat *v = zero ? xa_agg.lookup_or_try_init(k, zero) : NULL;
	if (v)
		kvmlp_lat_add(v, lat);
	else
		xa_count(XA_C_LOST_AGG_FULL);
}

KVMLP_ENTRY(XA_ERASE)
{
	/* The stack is taken at entry: at return the caller's frame is gone. */
	u64 stack = (u32)kvmlp_stackid(ctx);
	if (kvmlp_call_enter(KVMLP_FN_XA_ERASE, KVMLP_ARG(XA_ERASE, XA), stack))
		xa_count(XA_C_LOST_PENDING_FULL);
	return 0;
}

KVMLP_RETURN(XA_ERASE)
{
	struct kvmlp_call c;
	if (!kvmlp_call_exit(KVMLP_FN_XA_ERASE, &c))
		return 0;
	u64 now = bpf_ktime_get_ns();
	u64 lat = now - c.ts_ns;
	struct kvmlp_xa_key k = {};
	k.xa = c.a0;
	k.stack_id = (s32)c.a1;
	k.kvm = kvmlp_vm_of(c.a0, KVMLP_OFF_VCPU_ARRAY);
	k.owner = k.kvm ? XA_KVM_VCPU_ARRAY : XA_OTHER;
	if (!k.kvm) {
		k.kvm = kvmlp_vm_of(c.a0, KVMLP_OFF_LPI_XA);
		k.owner = k.kvm ? XA_KVM_LPI : XA_OTHER;
	}
	xa_count(XA_C_ERASES);
	xa_account(&k, lat);
	if (k.owner != XA_OTHER)
		xa_emit(now, lat, &k);
	return 0;
}

/* The erase of this vCPU's slot in kvm->vcpu_array follows (no latency: the
 * erase itself is not seen). */
KVMLP_ENTRY(VCPU_DESTROY)
{
	u64 vcpu = KVMLP_ARG(VCPU_DESTROY, VCPU);
	struct kvmlp_xa_key k = {};
	k.kvm = kvmlp_read_u64(vcpu, KVMLP_OFF_VCPU_KVM);
	if (!k.kvm || KVMLP_OFF_VCPU_ARRAY < 0)
		return 0;
	k.xa = k.kvm + KVMLP_OFF_VCPU_ARRAY;
	k.owner = XA_KVM_VCPU_ARRAY_BY_CALLER;
	k.stack_id = kvmlp_stackid(ctx);
	xa_count(XA_C_VCPU_DESTROYS);
	xa_account(&k, 0);
	xa_emit(bpf_ktime_get_ns(), 0, &k);
	return 0;
}
