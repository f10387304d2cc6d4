"""What nspawn's own seccomp filter cannot say, said by a filter of sandtrap's: Docker's answers, in nspawn boxes.

systemd-nspawn 252 refuses by name only and with EPERM only. Docker's profile (and sandtrap's, sandbox/docker/
seccomp.py) also answers io_uring with ENOSYS (a kernel without io_uring), clone3 with ENOSYS (its flags sit
behind a pointer; libc falls back to clone) and refuses clone with a new namespace's flag: otherwise
``clone(CLONE_NEWUSER|CLONE_NEWNET)`` gives a box's process every capability over a network namespace of its
own (netfilter's attack surface), though unshare and setns are refused by name. Here clone with CLONE_NEWUSER is
refused: nspawn itself (without --private-users) makes its namespaces with the other flags, and each of them
alone needs CAP_SYS_ADMIN, which a box never has (the kernel refuses them).

:func:`filter_program` compiles that filter with libseccomp; ``launch.argv`` loads it (:data:`LOADER`, a few
lines of the host's Python run by root, which may load a filter without no_new_privs) just before it execs
nspawn, whose own allow-list lets io_uring and clone3 through for it. nspawn, the box's PID 1 and every process
of the box inherit it; the kernel takes the strictest answer of all filters (ERRNO over nspawn's ALLOW). Nothing
else is refused by it.
"""

from __future__ import annotations

import errno
import tempfile

import pyseccomp

from sandtrap.sandbox.docker.seccomp import IO_URING

ENOSYS_CALLS = (*IO_URING, "clone3")
# clone(2)'s flag (include/uapi/linux/sched.h), its first argument on the architectures below.
CLONE_NEWUSER = 0x10000000

# The compat ABIs a native architecture also runs (nspawn adds the same ones to its own filter).
_COMPAT = {
    pyseccomp.Arch.X86_64: (pyseccomp.Arch.X86, pyseccomp.Arch.X32),
    pyseccomp.Arch.AARCH64: (pyseccomp.Arch.ARM,),
}

# argv: the filter's file, then the program and its arguments. prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, prog).
LOADER = (
    "import ctypes,os,sys\n"
    "b=open(sys.argv[1],'rb').read()\n"
    "buf=ctypes.create_string_buffer(b,len(b))\n"
    "class P(ctypes.Structure):_fields_=[('n',ctypes.c_ushort),('f',ctypes.c_void_p)]\n"
    "c=ctypes.CDLL(None,use_errno=True)\n"
    "if len(b)%8 or c.prctl(22,2,ctypes.byref(P(len(b)//8,ctypes.addressof(buf))),0,0):\n"
    " sys.exit('loading the box filter: '+os.strerror(ctypes.get_errno()))\n"
    "os.execvp(sys.argv[2],sys.argv[2:])\n"
)


def filter_program(native: int | None = None) -> bytes:
    """The classic BPF program (``struct sock_filter`` array) for the native architecture and its compat ABIs:
    io_uring_setup, _enter, _register and clone3 answer ENOSYS, clone with CLONE_NEWUSER EPERM; everything else is
    allowed (by this filter)."""
    arch = pyseccomp.system_arch() if native is None else native
    f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    if native is not None:
        f.remove_arch(pyseccomp.Arch.NATIVE)
        f.add_arch(arch)
    for compat in _COMPAT.get(arch, ()):
        f.add_arch(compat)
    for name in ENOSYS_CALLS:
        f.add_rule(pyseccomp.ERRNO(errno.ENOSYS), name)
    flag = pyseccomp.Arg(0, pyseccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)
    f.add_rule(pyseccomp.ERRNO(errno.EPERM), "clone", flag)
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()
