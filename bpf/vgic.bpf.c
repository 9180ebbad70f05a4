/* vgic (arm64): vgic_put_irq(kvm, irq): latency, intid (LPI or not), whether
 * this put dropped the last reference, and whether IRQs were off at the call
 * (seen only by the kprobe flavour, from the saved processor state). */

struct kvmlp_vgic_event {
	u64 ts_ns;
	u64 lat_ns;
	u64 kvm;
	u64 irq;
	u32 intid;      /* 0xffffffff: unknown on this kernel */
	u32 refcount;   /* at entry; 1 means the put released the IRQ */
	u32 irqs_off;   /* 1 off, 0 on, 2 unknown */
	u32 tid;
	u32 tgid;
	u32 pad;
};

BPF_RINGBUF_OUTPUT(vgic_events, KVMLP_RINGBUF_PAGES);
#define vgic_count(i) kvmlp_count(KVMLP_CBASE_VGIC + (i))

enum { VGIC_C_PUTS, VGIC_C_RINGBUF_FULL, VGIC_C_PENDING_FULL };

static __always_inline u32 vgic_irqs_off(void *ctx, int kprobe)
{
	if (!kprobe)
		return 2;
#if defined(CONFIG_ARM64)
	return (((struct pt_regs *)ctx)->pstate & 0x80) ? 1 : 0;      /* PSR_I_BIT */
#elif defined(CONFIG_X86)
	return (((struct pt_regs *)ctx)->flags & 0x200) ? 0 : 1;      /* X86_EFLAGS_IF */
#else
	return 2;
#endif
}

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
	c.a2 = KVMLP_OFF_IRQ_INTID >= 0 ? kvmlp_read_u32(irq, KVMLP_OFF_IRQ_INTID) : 0xffffffff;
	c.a3 = (u64)(KVMLP_OFF_IRQ_REFCOUNT >= 0 ? kvmlp_read_u32(irq, KVMLP_OFF_IRQ_REFCOUNT) : 0)
		<< 32 | vgic_irqs_off(ctx, KVMLP_M_VGIC_PUT == 2);
	if (kvmlp_call_save(KVMLP_FN_VGIC_PUT, &c))
		vgic_count(VGIC_C_PENDING_FULL);
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
		vgic_count(VGIC_C_RINGBUF_FULL);
		return 0;
	}
	u64 id = bpf_get_current_pid_tgid();
	e->ts_ns = bpf_ktime_get_ns();
	e->lat_ns = e->ts_ns - c.ts_ns;
	e->kvm = c.a1;
	e->irq = c.a0;
	e->intid = (u32)c.a2;
	e->refcount = c.a3 >> 32;
	e->irqs_off = (u32)c.a3;
	e->tid = (u32)id;
	e->tgid = id >> 32;
	vgic_events.ringbuf_submit(e, 0);
	return 0;
}
