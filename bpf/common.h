/* Shared by the function probes, which the loader compiles into one module so
 * that they share the VM registry and the stack map.
 *
 * Each target KEY is written once and compiles to the attach method the loader
 * chose (KVMLP_M_KEY, one of KVMLP_M_* below): fentry/fexit, kprobe/kretprobe, not
 * attached, or fentry/fexit on a symbol other targets share (a plain function here,
 * which the symbol's one program, made by the loader, calls). Its
 * arguments are read by position (KVMLP_A_KEY_PARAM, from BTF), never through a
 * struct declared in headers, which may be from another kernel. */
#ifndef KVMLP_COMMON_H
#define KVMLP_COMMON_H

#include <uapi/linux/ptrace.h>      /* struct pt_regs: the arch ABI, stable */
#include "kmaps.h"                    /* shared aggregates, KVMLP_HIST_SLOTS */

#define KVMLP_CAT_(a, b) a##b
/* Hides what the compiler knows of x: it keeps a bounding mask it could prove
 * redundant, which 6.1's verifier needs on branches it does not prune as dead */
#define KVMLP_OPAQUE(x) asm volatile("" : "+r"(x))
#define KVMLP_CAT(a, b) KVMLP_CAT_(a, b)

/* The attach methods (KVMLP_M_KEY), which the macros below paste as suffixes. */
#define KVMLP_M_OFF 0
#define KVMLP_M_FENTRY 1
#define KVMLP_M_KPROBE 2
#define KVMLP_M_SHARED_FENTRY 3

#define KVMLP_ENTRY(key) KVMLP_ENTRY_M(KVMLP_M_##key, KVMLP_S_##key, key)
#define KVMLP_ENTRY_M(m, sym, key) KVMLP_CAT(KVMLP_ENTRY_, m)(sym, key)
#define KVMLP_ENTRY_1(sym, key) KFUNC_PROBE(sym)
#define KVMLP_ENTRY_2(sym, key) int kvmlp_kp_##key(struct pt_regs *ctx)
#define KVMLP_ENTRY_0(sym, key) static __always_inline int kvmlp_off__##key(void *ctx)
#define KVMLP_ENTRY_3(sym, key) static __always_inline int kvmlp_fe__##key(unsigned long long *ctx)

/* A return handler reads no argument: in a kretprobe the argument registers hold
 * whatever the function left in them (only fexit sees the arguments), so what it
 * needs is saved at entry (kvmlp_call_save). The kretprobe flavour names its
 * context kvmlp_ret_regs, not ctx: KVMLP_ARG there does not compile. */
#define KVMLP_RETURN(key) KVMLP_RETURN_M(KVMLP_M_##key, KVMLP_S_##key, key)
#define KVMLP_RETURN_M(m, sym, key) KVMLP_CAT(KVMLP_RETURN_, m)(sym, key)
#define KVMLP_RETURN_1(sym, key) KRETFUNC_PROBE(sym)
#define KVMLP_RETURN_2(sym, key) int kvmlp_kr_##key(struct pt_regs *kvmlp_ret_regs)
#define KVMLP_RETURN_0(sym, key) static __always_inline int kvmlp_offr__##key(void *ctx)
#define KVMLP_RETURN_3(sym, key) static __always_inline int kvmlp_fx__##key(unsigned long long *ctx)

/* Argument PARAM of target KEY, as u64 (0 if this kernel's function lacks it). */
#define KVMLP_ARG(key, p) KVMLP_ARG_M(KVMLP_M_##key, KVMLP_A_##key##_##p)
#define KVMLP_ARG_M(m, i) KVMLP_CAT(KVMLP_ARG_, m)(i)
#define KVMLP_ARG_1(i) ((i) >= 0 ? (u64)ctx[(i) >= 0 ? (i) : 0] : 0)
#define KVMLP_ARG_2(i) kvmlp_kprobe_arg(ctx, i)
#define KVMLP_ARG_0(i) 0
#define KVMLP_ARG_3(i) KVMLP_ARG_1(i)
/* The return value (in a return handler). */
#define KVMLP_RET(key) KVMLP_RET_M(KVMLP_M_##key, KVMLP_N_##key)
#define KVMLP_RET_M(m, n) KVMLP_CAT(KVMLP_RET_, m)(n)
#define KVMLP_RET_1(n) ((u64)ctx[n])
#define KVMLP_RET_2(n) ((u64)PT_REGS_RC(kvmlp_ret_regs))
#define KVMLP_RET_0(n) 0
#define KVMLP_RET_3(n) KVMLP_RET_1(n)

static __always_inline u64 kvmlp_kprobe_arg(struct pt_regs *ctx, int i)
{
	switch (i) {
	case 0: return PT_REGS_PARM1(ctx);
	case 1: return PT_REGS_PARM2(ctx);
	case 2: return PT_REGS_PARM3(ctx);
	case 3: return PT_REGS_PARM4(ctx);
	case 4: return PT_REGS_PARM5(ctx);
	default: return 0;
	}
}


static __always_inline u64 kvmlp_read_u64(u64 base, int off)
{
	u64 v = 0;
	if (base && off >= 0)
		bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
	return v;
}

static __always_inline u32 kvmlp_read_u32(u64 base, int off)
{
	u32 v = 0;
	if (base && off >= 0)
		bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
	return v;
}

/* The context of a probe hit, from preempt_count where the task keeps it (arm64's
 * thread_info: preempt_off >= 0, from BTF); else (x86 keeps it per CPU, out of reach)
 * a kprobe's stack pointer outside the task's stack is "irq" (hardirq, or softirq
 * on the IRQ stack). Values are recorded: append only. */
enum kvmlp_context { KVMLP_CTX_TASK, KVMLP_CTX_SOFTIRQ, KVMLP_CTX_HARDIRQ, KVMLP_CTX_NMI,
		     KVMLP_CTX_UNKNOWN, KVMLP_CTX_IRQ };
/* IRQs at the call: only a kprobe sees the saved processor state. */
enum kvmlp_irqs { KVMLP_IRQS_ON, KVMLP_IRQS_OFF, KVMLP_IRQS_UNKNOWN };

static __always_inline u32 kvmlp_context(void *ctx, int kprobe, int preempt_off, int stack_off)
{
	u64 task = bpf_get_current_task();
	if (preempt_off >= 0) {
		u32 pc = kvmlp_read_u32(task, preempt_off);
		if (pc & 0x00f00000)            /* NMI_MASK */
			return KVMLP_CTX_NMI;
		if (pc & 0x000f0000)            /* HARDIRQ_MASK */
			return KVMLP_CTX_HARDIRQ;
		if (pc & 0x00000100)            /* SOFTIRQ_OFFSET: serving one, not just BH off */
			return KVMLP_CTX_SOFTIRQ;
		return KVMLP_CTX_TASK;
	}
	if (!kprobe || stack_off < 0)
		return KVMLP_CTX_UNKNOWN;
	u64 stack = kvmlp_read_u64(task, stack_off);
	u64 sp = PT_REGS_SP((struct pt_regs *)ctx);
	return sp - stack < KVMLP_THREAD_SIZE ? KVMLP_CTX_TASK : KVMLP_CTX_IRQ;
}

static __always_inline u32 kvmlp_irqs_at_call(void *ctx, int kprobe)
{
	if (!kprobe)
		return KVMLP_IRQS_UNKNOWN;
#if defined(CONFIG_ARM64)
	return (((struct pt_regs *)ctx)->pstate & 0x80) ? KVMLP_IRQS_OFF : KVMLP_IRQS_ON; /* PSR_I_BIT */
#elif defined(CONFIG_X86)
	return (((struct pt_regs *)ctx)->flags & 0x200) ? KVMLP_IRQS_ON : KVMLP_IRQS_OFF; /* EFLAGS_IF */
#else
	return KVMLP_IRQS_UNKNOWN;
#endif
}

/* Every probe's counters in one per-CPU array: probe P's counter i is at
 * KVMLP_CBASE_P + i (the loader lays them out from the catalog). */
BPF_PERCPU_ARRAY(kvmlp_counters, u64, KVMLP_NR_COUNTERS);

static __always_inline void kvmlp_count(int i)
{
	u64 *v = kvmlp_counters.lookup(&i);
	if (v)
		(*v)++;         /* per-CPU: no atomics needed */
}

/* A latency distribution: count, total, max and a log2 histogram. */
struct kvmlp_lat {
	u64 count;
	u64 total_ns;
	u64 max_ns;
	u64 hist[KVMLP_HIST_SLOTS];
};

/* A zeroed value to initialise map entries from: a kvmlp_lat is too big for the
 * 512-byte BPF stack. */
BPF_ARRAY(kvmlp_zero, struct kvmlp_lat, 1);

static __always_inline struct kvmlp_lat *kvmlp_lat_zero(void)
{
	int z = 0;
	return kvmlp_zero.lookup(&z);
}

static __always_inline void kvmlp_lat_add(struct kvmlp_lat *v, u64 ns)
{
	kvmlp_add(&v->count, 1);
	kvmlp_add(&v->total_ns, ns);
	kvmlp_max(&v->max_ns, ns);
	kvmlp_add(&v->hist[kvmlp_slot(ns)], 1);
}

/* VMs and vCPUs the probes have seen: struct kvm / kvm_vcpu address -> owner.
 * An entry is one lifetime, told apart by first_ns: the vms probe ends it when
 * the object is destroyed (the kernel may then reuse the address for another
 * VM, of another process), moving it to kvmlp_vm_ends / kvmlp_vcpu_ends with the
 * time it ended, where user space reads it (they are LRU: an end read already
 * may be evicted). Without the vms probe an entry lasts the whole session. */
#define KVMLP_VM_CREATED 1        /* kvmlp_vm.flags: registered at its creation */

struct kvmlp_vm {
	u32 tgid;
	u32 flags;
	u64 first_ns;
};

struct kvmlp_vcpu {
	u64 kvm;
	u32 tid;
	u32 tgid;
	s32 vcpu_idx;
	s32 vcpu_id;
	u64 first_ns;
};

struct kvmlp_vm_key {
	u64 kvm;
	u64 first_ns;
};

struct kvmlp_vm_end {
	u32 tgid;
	u32 pad;
	u64 end_ns;
};

struct kvmlp_vcpu_key {
	u64 vcpu;
	u64 first_ns;
};

struct kvmlp_vcpu_end {
	u64 kvm;
	u32 tid;
	u32 tgid;
	s32 vcpu_idx;
	s32 vcpu_id;
	u64 end_ns;
};

BPF_HASH(kvmlp_vms, u64, struct kvmlp_vm, 1024);
BPF_HASH(kvmlp_vcpus, u64, struct kvmlp_vcpu, 4096);
BPF_TABLE("lru_hash", struct kvmlp_vm_key, struct kvmlp_vm_end, kvmlp_vm_ends, 1024);
BPF_TABLE("lru_hash", struct kvmlp_vcpu_key, struct kvmlp_vcpu_end, kvmlp_vcpu_ends, 4096);
KVMLP_STACK_MAP(kvmlp_stacks, KVMLP_STACK_ENTRIES);

static __always_inline s32 kvmlp_stackid(void *ctx)
{
	s32 id = kvmlp_stacks.get_stackid(ctx, 0);
	return id == -KVMLP_EEXIST ? kvmlp_stacks.get_stackid(ctx, KVMLP_SKIP_ONE) : id;
}

/* A VM seen in use: registered unless it is already (its owner is the process
 * that created it, or else the first seen using it). */
static __always_inline void kvmlp_note_vm(u64 kvm)
{
	if (!kvm)
		return;
	struct kvmlp_vm v = {};
	v.tgid = bpf_get_current_pid_tgid() >> 32;
	v.first_ns = bpf_ktime_get_ns();
	kvmlp_vms.insert(&kvm, &v);
}

/* The lifetime (kvm, first_ns) of owner tgid ended now. */
static __always_inline void kvmlp_vm_ended(u64 kvm, u64 first_ns, u32 tgid)
{
	struct kvmlp_vm_key k = {kvm, first_ns};
	struct kvmlp_vm_end e = {};
	e.tgid = tgid;
	e.end_ns = bpf_ktime_get_ns();
	kvmlp_vm_ends.update(&k, &e);
}

/* The VM registered at `kvm` is gone: its entry ends. */
static __always_inline void kvmlp_end_vm(u64 kvm)
{
	struct kvmlp_vm *v = kvmlp_vms.lookup(&kvm);
	if (!v)
		return;
	kvmlp_vm_ended(kvm, v->first_ns, v->tgid);
	kvmlp_vms.delete(&kvm);
}

/* The vCPU registered at `vcpu` is gone: its entry ends. */
static __always_inline void kvmlp_end_vcpu(u64 vcpu)
{
	struct kvmlp_vcpu *v = kvmlp_vcpus.lookup(&vcpu);
	if (!v)
		return;
	struct kvmlp_vcpu_key k = {vcpu, v->first_ns};
	struct kvmlp_vcpu_end e = {};
	e.kvm = v->kvm;
	e.tid = v->tid;
	e.tgid = v->tgid;
	e.vcpu_idx = v->vcpu_idx;
	e.vcpu_id = v->vcpu_id;
	e.end_ns = bpf_ktime_get_ns();
	kvmlp_vcpu_ends.update(&k, &e);
	kvmlp_vcpus.delete(&vcpu);
}

/* The VM a struct member at `addr` belongs to, if `addr - off` is a known VM. */
static __always_inline u64 kvmlp_vm_of(u64 addr, int off)
{
	if (off < 0 || !addr)
		return 0;
	u64 kvm = addr - off;
	return kvmlp_vms.lookup(&kvm) ? kvm : 0;
}

/* Per-thread state between a function's entry and its return, by function: the
 * loader numbers each target with a return handler KVMLP_FN_KEY (1, 2, ...). */

struct kvmlp_call_key {
	u32 tid;
	u32 fn;
};

struct kvmlp_call {
	u64 ts_ns;
	u64 a0;
	u64 a1;
	u64 a2;
	u64 a3;
};

BPF_HASH(kvmlp_calls, struct kvmlp_call_key, struct kvmlp_call, 16384);

/* Saves what the return handler needs (ts_ns is set here); nonzero if the map
 * is full. */
static __always_inline int kvmlp_call_save(u32 fn, struct kvmlp_call *c)
{
	struct kvmlp_call_key k = {(u32)bpf_get_current_pid_tgid(), fn};
	c->ts_ns = bpf_ktime_get_ns();
	return kvmlp_calls.update(&k, c);
}

static __always_inline int kvmlp_call_enter(u32 fn, u64 a0, u64 a1)
{
	struct kvmlp_call c = {};
	c.a0 = a0;
	c.a1 = a1;
	return kvmlp_call_save(fn, &c);
}

/* Copies out and forgets the entry state; 0 if none was recorded. */
static __always_inline int kvmlp_call_exit(u32 fn, struct kvmlp_call *out)
{
	struct kvmlp_call_key k = {(u32)bpf_get_current_pid_tgid(), fn};
	struct kvmlp_call *c = kvmlp_calls.lookup(&k);
	if (!c)
		return 0;
	*out = *c;
	kvmlp_calls.delete(&k);
	return 1;
}

#endif
