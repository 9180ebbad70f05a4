/* Shared by the function probes, which the loader compiles into one module so
 * that they share the VM registry and the stack map.
 *
 * Each target KEY is written once and compiles to the attach method the loader
 * chose (KLP_M_KEY): 1 fentry/fexit, 2 kprobe/kretprobe, 0 not attached, 3
 * fentry/fexit on a symbol other targets share (a plain function here, which the
 * symbol's one program, made by the loader, calls). Its
 * arguments are read by position (KLP_A_KEY_PARAM, from BTF), never through a
 * struct declared in headers, which may be from another kernel. */
#ifndef KLP_COMMON_H
#define KLP_COMMON_H

#include <uapi/linux/ptrace.h>      /* struct pt_regs: the arch ABI, stable */
#include "kmaps.h"                    /* shared aggregates, KLP_HIST_SLOTS */

#define KLP_CAT_(a, b) a##b
#define KLP_CAT(a, b) KLP_CAT_(a, b)

#define KLP_ENTRY(key) KLP_ENTRY_M(KLP_M_##key, KLP_S_##key, key)
#define KLP_ENTRY_M(m, sym, key) KLP_CAT(KLP_ENTRY_, m)(sym, key)
#define KLP_ENTRY_1(sym, key) KFUNC_PROBE(sym)
#define KLP_ENTRY_2(sym, key) int klp_kp__##key(struct pt_regs *ctx)
#define KLP_ENTRY_0(sym, key) static __always_inline int klp_off__##key(void *ctx)
#define KLP_ENTRY_3(sym, key) static __always_inline int klp_fe__##key(unsigned long long *ctx)

/* A return handler reads no argument: in a kretprobe the argument registers hold
 * whatever the function left in them (only fexit sees the arguments), so what it
 * needs is saved at entry (klp_call_save). The kretprobe flavour names its
 * context klp_ret_regs, not ctx: KLP_ARG there does not compile. */
#define KLP_RETURN(key) KLP_RETURN_M(KLP_M_##key, KLP_S_##key, key)
#define KLP_RETURN_M(m, sym, key) KLP_CAT(KLP_RETURN_, m)(sym, key)
#define KLP_RETURN_1(sym, key) KRETFUNC_PROBE(sym)
#define KLP_RETURN_2(sym, key) int klp_kr__##key(struct pt_regs *klp_ret_regs)
#define KLP_RETURN_0(sym, key) static __always_inline int klp_offr__##key(void *ctx)
#define KLP_RETURN_3(sym, key) static __always_inline int klp_fx__##key(unsigned long long *ctx)

/* Argument PARAM of target KEY, as u64 (0 if this kernel's function lacks it). */
#define KLP_ARG(key, p) KLP_ARG_M(KLP_M_##key, KLP_A_##key##_##p)
#define KLP_ARG_M(m, i) KLP_CAT(KLP_ARG_, m)(i)
#define KLP_ARG_1(i) ((i) >= 0 ? (u64)ctx[(i) >= 0 ? (i) : 0] : 0)
#define KLP_ARG_2(i) klp_kprobe_arg(ctx, i)
#define KLP_ARG_0(i) 0
#define KLP_ARG_3(i) KLP_ARG_1(i)
/* The return value (in a return handler). */
#define KLP_RET(key) KLP_RET_M(KLP_M_##key, KLP_N_##key)
#define KLP_RET_M(m, n) KLP_CAT(KLP_RET_, m)(n)
#define KLP_RET_1(n) ((u64)ctx[n])
#define KLP_RET_2(n) ((u64)PT_REGS_RC(klp_ret_regs))
#define KLP_RET_0(n) 0
#define KLP_RET_3(n) KLP_RET_1(n)

static __always_inline u64 klp_kprobe_arg(struct pt_regs *ctx, int i)
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


static __always_inline u64 klp_read_u64(u64 base, int off)
{
	u64 v = 0;
	if (base && off >= 0)
		bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
	return v;
}

static __always_inline u32 klp_read_u32(u64 base, int off)
{
	u32 v = 0;
	if (base && off >= 0)
		bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
	return v;
}

/* Every probe's counters in one per-CPU array: probe P's counter i is at
 * KLP_CBASE_P + i (the loader lays them out from the catalog). */
BPF_PERCPU_ARRAY(klp_counters, u64, KLP_NR_COUNTERS);

static __always_inline void klp_count(int i)
{
	u64 *v = klp_counters.lookup(&i);
	if (v)
		(*v)++;         /* per-CPU: no atomics needed */
}

/* A latency distribution: count, total, max and a log2 histogram. */
struct klp_lat {
	u64 count;
	u64 total_ns;
	u64 max_ns;
	u64 hist[KLP_HIST_SLOTS];
};

/* A zeroed value to initialise map entries from: a klp_lat is too big for the
 * 512-byte BPF stack. */
BPF_ARRAY(klp_zero, struct klp_lat, 1);

static __always_inline struct klp_lat *klp_lat_zero(void)
{
	int z = 0;
	return klp_zero.lookup(&z);
}

static __always_inline void klp_lat_add(struct klp_lat *v, u64 ns)
{
	klp_add(&v->count, 1);
	klp_add(&v->total_ns, ns);
	klp_max(&v->max_ns, ns);
	klp_add(&v->hist[klp_slot(ns)], 1);
}

/* VMs and vCPUs the probes have seen: struct kvm / kvm_vcpu address -> owner.
 * An entry is one lifetime, told apart by first_ns: the vms probe ends it when
 * the object is destroyed (the kernel may then reuse the address for another
 * VM, of another process), moving it to klp_vm_ends / klp_vcpu_ends with the
 * time it ended, where user space reads it (they are LRU: an end read already
 * may be evicted). Without the vms probe an entry lasts the whole session. */
#define KLP_VM_CREATED 1        /* klp_vm.flags: registered at its creation */

struct klp_vm {
	u32 tgid;
	u32 flags;
	u64 first_ns;
};

struct klp_vcpu {
	u64 kvm;
	u32 tid;
	u32 tgid;
	s32 vcpu_idx;
	s32 vcpu_id;
	u64 first_ns;
};

struct klp_vm_key {
	u64 kvm;
	u64 first_ns;
};

struct klp_vm_end {
	u32 tgid;
	u32 pad;
	u64 end_ns;
};

struct klp_vcpu_key {
	u64 vcpu;
	u64 first_ns;
};

struct klp_vcpu_end {
	u64 kvm;
	u32 tid;
	u32 tgid;
	s32 vcpu_idx;
	s32 vcpu_id;
	u64 end_ns;
};

BPF_HASH(klp_vms, u64, struct klp_vm, 1024);
BPF_HASH(klp_vcpus, u64, struct klp_vcpu, 4096);
BPF_TABLE("lru_hash", struct klp_vm_key, struct klp_vm_end, klp_vm_ends, 1024);
BPF_TABLE("lru_hash", struct klp_vcpu_key, struct klp_vcpu_end, klp_vcpu_ends, 4096);
KLP_STACK_MAP(klp_stacks, KLP_STACK_ENTRIES);

/* A VM seen in use: registered unless it is already (its owner is the process
 * that created it, or else the first seen using it). */
static __always_inline void klp_note_vm(u64 kvm)
{
	if (!kvm)
		return;
	struct klp_vm v = {};
	v.tgid = bpf_get_current_pid_tgid() >> 32;
	v.first_ns = bpf_ktime_get_ns();
	klp_vms.insert(&kvm, &v);
}

/* The lifetime (kvm, first_ns) of owner tgid ended now. */
static __always_inline void klp_vm_ended(u64 kvm, u64 first_ns, u32 tgid)
{
	struct klp_vm_key k = {kvm, first_ns};
	struct klp_vm_end e = {};
	e.tgid = tgid;
	e.end_ns = bpf_ktime_get_ns();
	klp_vm_ends.update(&k, &e);
}

/* The VM registered at `kvm` is gone: its entry ends. */
static __always_inline void klp_end_vm(u64 kvm)
{
	struct klp_vm *v = klp_vms.lookup(&kvm);
	if (!v)
		return;
	klp_vm_ended(kvm, v->first_ns, v->tgid);
	klp_vms.delete(&kvm);
}

/* The vCPU registered at `vcpu` is gone: its entry ends. */
static __always_inline void klp_end_vcpu(u64 vcpu)
{
	struct klp_vcpu *v = klp_vcpus.lookup(&vcpu);
	if (!v)
		return;
	struct klp_vcpu_key k = {vcpu, v->first_ns};
	struct klp_vcpu_end e = {};
	e.kvm = v->kvm;
	e.tid = v->tid;
	e.tgid = v->tgid;
	e.vcpu_idx = v->vcpu_idx;
	e.vcpu_id = v->vcpu_id;
	e.end_ns = bpf_ktime_get_ns();
	klp_vcpu_ends.update(&k, &e);
	klp_vcpus.delete(&vcpu);
}

/* The VM a struct member at `addr` belongs to, if `addr - off` is a known VM. */
static __always_inline u64 klp_vm_of(u64 addr, int off)
{
	if (off < 0 || !addr)
		return 0;
	u64 kvm = addr - off;
	return klp_vms.lookup(&kvm) ? kvm : 0;
}

/* Per-thread state between a function's entry and its return, by function. */
enum klp_fn {
	KLP_FN_XEN_FAST = 1, KLP_FN_XEN_SLOW, KLP_FN_GPC_REFRESH, KLP_FN_GPC_CHECK,
	KLP_FN_VGIC_PUT, KLP_FN_XA_ERASE, KLP_FN_SYNC, KLP_FN_SYNC_EXP, KLP_FN_VM_DESTROY,
};

struct klp_call_key {
	u32 tid;
	u32 fn;
};

struct klp_call {
	u64 ts_ns;
	u64 a0;
	u64 a1;
	u64 a2;
	u64 a3;
};

BPF_HASH(klp_calls, struct klp_call_key, struct klp_call, 16384);

/* Saves what the return handler needs (ts_ns is set here); nonzero if the map
 * is full. */
static __always_inline int klp_call_save(u32 fn, struct klp_call *c)
{
	struct klp_call_key k = {(u32)bpf_get_current_pid_tgid(), fn};
	c->ts_ns = bpf_ktime_get_ns();
	return klp_calls.update(&k, c);
}

static __always_inline int klp_call_enter(u32 fn, u64 a0, u64 a1)
{
	struct klp_call c = {};
	c.a0 = a0;
	c.a1 = a1;
	return klp_call_save(fn, &c);
}

/* Copies out and forgets the entry state; 0 if none was recorded. */
static __always_inline int klp_call_exit(u32 fn, struct klp_call *out)
{
	struct klp_call_key k = {(u32)bpf_get_current_pid_tgid(), fn};
	struct klp_call *c = klp_calls.lookup(&k);
	if (!c)
		return 0;
	*out = *c;
	klp_calls.delete(&k);
	return 1;
}

#endif
