/* xen_evtchn: kvm_xen_set_evtchn_fast(xe, kvm) outcome and latency per call;
 * the slow path kvm_xen_set_evtchn() where it is a separate symbol. */

struct kvmlp_xen_event {
	u64 ts_ns;
	u64 lat_ns;
	u64 kvm;
	u32 port;
	u32 vcpu_id;
	s32 ret;        /* 1 delivered, 0 already pending, -ENOTCONN masked,
	                 * -EINVAL bad port/vCPU, -EWOULDBLOCK: take the slow path */
	u32 tid;
	u32 tgid;
	u32 slow;       /* 0: the fast path, 1: the slow path */
};

BPF_RINGBUF_OUTPUT(xen_events, KVMLP_RINGBUF_PAGES);
#define xen_count(i) kvmlp_count(KVMLP_CBASE_XEN_EVTCHN + (i))

enum xen_evtchn_counter { XEN_C_CALLS, XEN_C_LOST_RINGBUF_FULL, XEN_C_LOST_PENDING_FULL };

static __always_inline int xen_enter(u32 fn, u64 xe, u64 kvm)
{
	kvmlp_note_vm(kvm);
	if (kvmlp_call_enter(fn, xe, kvm))
		xen_count(XEN_C_LOST_PENDING_FULL);
	return 0;
}

static __always_inline int xen_exit(u32 fn, s32 ret)
{
	struct kvmlp_call c;
	if (!kvmlp_call_exit(fn, &c))
		return 0;
	xen_count(XEN_C_CALLS);
	struct kvmlp_xen_event *e = xen_events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		xen_count(XEN_C_LOST_RINGBUF_FULL);
		return 0;
	}
	u64 id = bpf_get_current_pid_tgid();
	e->ts_ns = bpf_ktime_get_ns();
	e->lat_ns = e->ts_ns - c.ts_ns;
	e->kvm = c.a1;
	e->port = kvmlp_read_u32(c.a0, KVMLP_OFF_XE_PORT);
	e->vcpu_id = kvmlp_read_u32(c.a0, KVMLP_OFF_XE_VCPU_ID);
	e->ret = ret;
	e->tid = (u32)id;
	e->tgid = id >> 32;
	e->slow = fn == KVMLP_FN_XEN_SLOW;
	xen_events.ringbuf_submit(e, 0);
	return 0;
}

KVMLP_ENTRY(XEN_FAST)
{
	return xen_enter(KVMLP_FN_XEN_FAST, KVMLP_ARG(XEN_FAST, XE), KVMLP_ARG(XEN_FAST, KVM));
}

KVMLP_RETURN(XEN_FAST)
{
	return xen_exit(KVMLP_FN_XEN_FAST, (s32)KVMLP_RET(XEN_FAST));
}

KVMLP_ENTRY(XEN_SLOW)
{
	return xen_enter(KVMLP_FN_XEN_SLOW, KVMLP_ARG(XEN_SLOW, XE), KVMLP_ARG(XEN_SLOW, KVM));
}

KVMLP_RETURN(XEN_SLOW)
{
	return xen_exit(KVMLP_FN_XEN_SLOW, (s32)KVMLP_RET(XEN_SLOW));
}
