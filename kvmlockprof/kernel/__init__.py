"""Kernel access: the host's kernel (release, capabilities, config, tracefs, headers),
its BTF and symbols, and bcc: compiling and loading BPF, reading its maps and ring
buffers, its run-time stats, and what this kernel lets each probe attach with."""
