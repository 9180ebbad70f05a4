/* vms: learn struct kvm and struct kvm_vcpu addresses, with their owners, from
 * the VM and vCPU ioctls (filp->private_data is the kvm / the vcpu). */

KLP_ENTRY(VM_IOCTL)
{
	u64 filp = KLP_ARG(VM_IOCTL, FILP);
	klp_note_vm(klp_read_u64(filp, KLP_OFF_FILE_PRIVATE_DATA));
	return 0;
}

#define KVM_RUN 0xae80          /* _IO(KVMIO, 0x80): UAPI */

KLP_ENTRY(VCPU_IOCTL)
{
	u64 filp = KLP_ARG(VCPU_IOCTL, FILP);
	u64 vcpu = klp_read_u64(filp, KLP_OFF_FILE_PRIVATE_DATA);
	if (!vcpu)
		return 0;
	/* The vCPU's thread is the one that runs it: set-up ioctls may come from
	 * another thread, so a KVM_RUN from a new thread updates the entry. KVM_RUN
	 * comes once per exit to user space (tens of thousands a second), hence a
	 * lookup first: an update takes the bucket lock. */
	u64 id = bpf_get_current_pid_tgid();
	struct klp_vcpu *known = klp_vcpus.lookup(&vcpu);
	if (known && (known->tid == (u32)id || (u32)KLP_ARG(VCPU_IOCTL, IOCTL) != KVM_RUN))
		return 0;
	struct klp_vcpu v = {};
	v.kvm = klp_read_u64(vcpu, KLP_OFF_VCPU_KVM);
	v.tid = (u32)id;
	v.tgid = id >> 32;
	v.vcpu_idx = KLP_OFF_VCPU_IDX >= 0 ? (s32)klp_read_u32(vcpu, KLP_OFF_VCPU_IDX) : -1;
	v.vcpu_id = KLP_OFF_VCPU_ID >= 0 ? (s32)klp_read_u32(vcpu, KLP_OFF_VCPU_ID) : -1;
	klp_vcpus.update(&vcpu, &v);
	klp_note_vm(v.kvm);
	return 0;
}
