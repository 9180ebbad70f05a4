/* vgic (arm64): vgic_put_irq(kvm, irq): latency, intid (LPI or not), whether
 * this put dropped the last reference (and so erased the LPI from lpi_xa, under
 * its lock), its caller, and its context: hardirq/softirq/task and whether IRQs
 * were off (seen only by the kprobe flavour, from the saved processor state). */

struct kvmlp_vgic_event {
	u64 ts_ns;
	u64 lat_ns;
	u64 kvm;
	u64 irq;
	u32 intid;      /* VGIC_INTID_UNKNOWN where BTF lacks irq->intid */
	u32 refcount;   /* at entry; 1 means the put released the IRQ */
	u32 irqs_off;   /* enum kvmlp_irqs */
	u32 context;    /* enum kvmlp_context */
	s32 stack_id;   /* in kvmlp_stacks: the caller */
	u32 tid;
	u32 tgid;
};

#define VGIC_INTID_UNKNOWN 0xffffffff
#define VGIC_MIN_LPI 8192       /* the GIC architecture's first LPI INTID */

BPF_RINGBUF_OUTPUT(vgic_events, KVMLP_RINGBUF_PAGES);
#define vgic_count(i) kvmlp_count(KVMLP_CBASE_VGIC + (i))

enum vgic_counter { VGIC_C_PUTS, VGIC_C_LOST_RINGBUF_FULL, VGIC_C_LOST_PENDING_FULL };
/* Everything the event needs is taken at entry: the kretprobe flavour cannot
 * read arguments at return, and a put that drops the last reference frees the
 * IRQ (6.1: kfree) before returning. */
KVMLP_ENTRY(VGIC_PUT)
{
	u64 kvm = KVMLP_ARG(VGIC_PUT, KVM);
	u64 irq = KVMLP_ARG(VGIC_PUT, IRQ);
	kvmlp_note_vm(kvm);
	struct kvmlp_call c = {};
	c.a0 = irq;
	c.a1 = kvm;
	c.a2 = (KVMLP_OFF_IRQ_INTID >= 0 ? kvmlp_read_u32(irq, KVMLP_OFF_IRQ_INTID) :
		VGIC_INTID_UNKNOWN) | (u64)(u32)kvmlp_stackid(ctx) << 32;
	c.a3 = (u64)(KVMLP_OFF_IRQ_REFCOUNT >= 0 ? kvmlp_read_u32(irq, KVMLP_OFF_IRQ_REFCOUNT) : 0)
		<< 32 | kvmlp_context(ctx, KVMLP_M_VGIC_PUT == KVMLP_M_KPROBE, KVMLP_OFF_TASK_PREEMPT, -1)
		<< 8 | kvmlp_irqs_at_call(ctx, KVMLP_M_VGIC_PUT == KVMLP_M_KPROBE);
	if (kvmlp_call_save(KVMLP_FN_VGIC_PUT, &c))
		vgic_count(VGIC_C_LOST_PENDING_FULL);
	return 0;
}

KVMLP_RETURN(VGIC_PUT)
{
	struct kvmlp_call c;
	if (!kvmlp_call_exit(KVMLP_FN_VGIC_PUT, &c))
		return 0;
	vgic_count(VGIC_C_PUTS);
	struct kvmlp_vgic_event *e = vgic_events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		vgic_count(VGIC_C_LOST_RINGBUF_FULL);
		return 0;
	}
	u64 id = bpf_get_current_pid_tgid();
	e->ts_ns = bpf_ktime_get_ns();
	e->lat_ns = e->ts_ns - c.ts_ns;
	e->kvm = c.a1;
	e->irq = c.a0;
	e->intid = (u32)c.a2;
	e->stack_id = (s32)(c.a2 >> 32);
	e->refcount = c.a3 >> 32;
	e->irqs_off = (u8)c.a3;
	e->context = (u8)(c.a3 >> 8);
	e->tid = (u32)id;
	e->tgid = id >> 32;
	vgic_events.ringbuf_submit(e, 0);
	return 0;
}
