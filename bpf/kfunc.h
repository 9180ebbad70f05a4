/* kfunc calls under bcc 0.26, which relocates none (libbpf would): a call is
 * written as one of a helper numbered KVMLP_KFUNC_MARK plus the kfunc's BTF id in
 * vmlinux (btf.KFUNC fields: -1 where the kernel lacks it), and bpfload.load_func
 * rewrites each such call into the kfunc call the kernel knows
 * (BPF_PSEUDO_KFUNC_CALL, the id as its immediate). No helper is numbered near the
 * mark. Only programs loaded by bpfload.load_func may call one. */
#ifndef KVMLP_KFUNC_H
#define KVMLP_KFUNC_H

#define KVMLP_KFUNC_MARK 0x40000000
#define KVMLP_KFUNC(btf_id) ((void *)(long)(KVMLP_KFUNC_MARK + (btf_id)))

#endif
