/* vms: learn struct kvm and struct kvm_vcpu addresses, with their owners, from
 * the VM and vCPU ioctls (filp->private_data is the kvm / the vcpu), and from
 * their creation where it can be seen; end them when they are destroyed, so
 * that an address the kernel reuses for a new VM (or vCPU) gets its new owner. */

#define vms_count(i) kvmlp_count(KVMLP_CBASE_VMS + (i))

enum vms_counter {
	VMS_C_VMS_CREATED, VMS_C_VMS_DESTROYED, VMS_C_VCPUS_CREATED, VMS_C_VCPUS_DESTROYED,
	VMS_C_LOST_PENDING_FULL,
};

KVMLP_ENTRY(VM_IOCTL)
{
	u64 filp = KVMLP_ARG(VM_IOCTL, FILP);
	kvmlp_note_vm(kvmlp_read_u64(filp, KVMLP_OFF_FILE_PRIVATE_DATA));
	return 0;
}

#define KVM_RUN 0xae80          /* _IO(KVMIO, 0x80): UAPI */

KVMLP_ENTRY(VCPU_IOCTL)
{
	u64 filp = KVMLP_ARG(VCPU_IOCTL, FILP);
	u64 vcpu = kvmlp_read_u64(filp, KVMLP_OFF_FILE_PRIVATE_DATA);
	if (!vcpu)
		return 0;
	/* The vCPU's thread is the one that runs it: set-up ioctls may come from
	 * another thread, so a KVM_RUN from a new thread updates the entry (the same
	 * lifetime: first_ns stays). KVM_RUN comes once per exit to user space (tens
	 * of thousands a second), hence a lookup first: an update takes the bucket
	 * lock. */
	u64 id = bpf_get_current_pid_tgid();
	struct kvmlp_vcpu *known = kvmlp_vcpus.lookup(&vcpu);
	if (known && (known->tid == (u32)id || (u32)KVMLP_ARG(VCPU_IOCTL, IOCTL) != KVM_RUN))
		return 0;
	struct kvmlp_vcpu v = {};
	v.kvm = kvmlp_read_u64(vcpu, KVMLP_OFF_VCPU_KVM);
	v.tid = (u32)id;
	v.tgid = id >> 32;
	v.vcpu_idx = KVMLP_OFF_VCPU_IDX >= 0 ? (s32)kvmlp_read_u32(vcpu, KVMLP_OFF_VCPU_IDX) : -1;
	v.vcpu_id = KVMLP_OFF_VCPU_ID >= 0 ? (s32)kvmlp_read_u32(vcpu, KVMLP_OFF_VCPU_ID) : -1;
	v.first_ns = known ? known->first_ns : bpf_ktime_get_ns();
	kvmlp_vcpus.update(&vcpu, &v);
	kvmlp_note_vm(v.kvm);
	return 0;
}

/* kvm_arch_init_vm(kvm, type), as KVM_CREATE_VM builds the VM: a new lifetime,
 * owned by the creating process. An entry still at that address is a VM whose
 * destruction was missed: it ends now. */
KVMLP_ENTRY(VM_CREATE)
{
	u64 kvm = KVMLP_ARG(VM_CREATE, KVM);
	if (!kvm)
		return 0;
	vms_count(VMS_C_VMS_CREATED);
	kvmlp_end_vm(kvm);
	struct kvmlp_vm v = {};
	v.tgid = bpf_get_current_pid_tgid() >> 32;
	v.flags = KVMLP_VM_CREATED;
	v.first_ns = bpf_ktime_get_ns();
	kvmlp_vms.update(&kvm, &v);
	return 0;
}

/* kvm_destroy_vm(kvm) (else kvm_arch_destroy_vm): the VM ends at the return, not
 * at entry: its teardown still uses it (vCPU-array erases, gpc deactivations
 * that would register it again). Entry saves the address and the lifetime it
 * had (a kretprobe cannot read the argument at return). */
KVMLP_ENTRY(VM_DESTROY)
{
	u64 kvm = KVMLP_ARG(VM_DESTROY, KVM);
	struct kvmlp_vm *v = kvmlp_vms.lookup(&kvm);
	struct kvmlp_call c = {};
	c.a0 = kvm;
	c.a1 = v ? v->first_ns : 0;
	c.a2 = v ? v->tgid : 0;
	if (kvmlp_call_save(KVMLP_FN_VM_DESTROY, &c))
		vms_count(VMS_C_LOST_PENDING_FULL);
	return 0;
}

KVMLP_RETURN(VM_DESTROY)
{
	struct kvmlp_call c;
	if (!kvmlp_call_exit(KVMLP_FN_VM_DESTROY, &c))
		return 0;
	vms_count(VMS_C_VMS_DESTROYED);
	u64 kvm = c.a0;
	struct kvmlp_vm *v = kvmlp_vms.lookup(&kvm);
	/* kvm_destroy_vm frees the VM before it returns: a VM created at the same
	 * address since (seen at its creation, another lifetime) stays. */
	if (v && (v->first_ns == c.a1 || !(v->flags & KVMLP_VM_CREATED)))
		kvmlp_end_vm(kvm);
	else if (c.a1)
		kvmlp_vm_ended(kvm, c.a1, (u32)c.a2);
	return 0;
}

/* kvm_arch_vcpu_postcreate(vcpu): KVM_CREATE_VCPU succeeded (the vCPU is in
 * kvm->vcpu_array and has its fd). Registered with the creating thread (its
 * KVM_RUN thread takes over). An entry of another VM at that address is a vCPU
 * whose destruction was missed: it ends now; one of this VM was registered by an
 * ioctl on the new fd, racing with this, and stays. */
KVMLP_ENTRY(VCPU_CREATE)
{
	u64 vcpu = KVMLP_ARG(VCPU_CREATE, VCPU);
	if (!vcpu)
		return 0;
	vms_count(VMS_C_VCPUS_CREATED);
	u64 kvm = kvmlp_read_u64(vcpu, KVMLP_OFF_VCPU_KVM);
	struct kvmlp_vcpu *known = kvmlp_vcpus.lookup(&vcpu);
	if (known) {
		if (known->kvm == kvm)
			return 0;
		kvmlp_end_vcpu(vcpu);
	}
	u64 id = bpf_get_current_pid_tgid();
	struct kvmlp_vcpu v = {};
	v.kvm = kvm;
	v.tid = (u32)id;
	v.tgid = id >> 32;
	v.vcpu_idx = KVMLP_OFF_VCPU_IDX >= 0 ? (s32)kvmlp_read_u32(vcpu, KVMLP_OFF_VCPU_IDX) : -1;
	v.vcpu_id = KVMLP_OFF_VCPU_ID >= 0 ? (s32)kvmlp_read_u32(vcpu, KVMLP_OFF_VCPU_ID) : -1;
	v.first_ns = bpf_ktime_get_ns();
	kvmlp_vcpus.update(&vcpu, &v);
	kvmlp_note_vm(kvm);
	return 0;
}

/* kvm_arch_vcpu_destroy(vcpu): every vCPU torn down, at VM destruction or when a
 * KVM_CREATE_VCPU fails after the arch part was made (then with no create). */
KVMLP_ENTRY(VCPU_TEARDOWN)
{
	vms_count(VMS_C_VCPUS_DESTROYED);
	kvmlp_end_vcpu(KVMLP_ARG(VCPU_TEARDOWN, VCPU));
	return 0;
}
