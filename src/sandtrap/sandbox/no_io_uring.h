/*
 * A seccomp filter of our own, stacked on the engine's: io_uring_setup, io_uring_enter and
 * io_uring_register fail with ENOSYS, as on a kernel built without io_uring. Docker 20.10's
 * default profile allows them, and io_uring is a large part of the kernel's attack surface.
 *
 * Shared by init.c (PID 1 installs it before it starts any daemon, so every process of its tree
 * inherits it) and session.c (installed before the user's shell or command runs: an exec'd session
 * is no descendant of PID 1). A seccomp filter needs no_new_privs without CAP_SYS_ADMIN, so this
 * sets it too; the engine sets it already when sandbox.no_new_privileges is on (the default).
 *
 * Syscall numbers from 403 up are the same on every architecture Linux added them to after 5.1
 * (the "unified" table): io_uring is 425-427 on x86-64 (also through the x32 ABI, which sets bit
 * 30), i386, arm, arm64, riscv64, ppc64le and s390x. On any other architecture the numbers mean
 * something else or nothing, so the filter lets them through to the engine's own filter.
 */
#ifndef NO_IO_URING_H
#define NO_IO_URING_H

#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>

#define IO_URING_FIRST 425 /* io_uring_setup */
#define IO_URING_LAST 427  /* io_uring_register (426 is io_uring_enter) */
#define X32_SYSCALL_BIT 0x40000000u

/* Install the filter on the calling thread (inherited by its children); 0 on success, -1 with errno. */
static int block_io_uring(void)
{
	enum { /* instruction indexes, for the jumps below */
	       X86 = 9,
	       GENERIC = 12,
	};
	struct sock_filter code[] = {
		/* 0 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		/* 1 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, X86 - 2, 0),
		/* 2 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_I386, GENERIC - 3, 0),
		/* 3 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_AARCH64, GENERIC - 4, 0),
		/* 4 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_ARM, GENERIC - 5, 0),
		/* 5 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_RISCV64, GENERIC - 6, 0),
		/* 6 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_PPC64LE, GENERIC - 7, 0),
		/* 7 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_S390X, GENERIC - 8, 0),
		/* 8 */ BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW), /* another architecture: not ours to judge */
		/* 9: x86-64, native or x32 */
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		/* 10 */ BPF_STMT(BPF_ALU | BPF_AND | BPF_K, ~X32_SYSCALL_BIT),
		/* 11 */ BPF_JUMP(BPF_JMP | BPF_JA, 1, 0, 0),
		/* 12: the unified numbers */
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		/* 13 */ BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, IO_URING_FIRST, 0, 2),
		/* 14 */ BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K, IO_URING_LAST, 1, 0),
		/* 15 */ BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
		/* 16 */ BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {.len = (unsigned short)(sizeof(code) / sizeof(code[0])), .filter = code};
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
		return -1;
	return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
}

#endif
