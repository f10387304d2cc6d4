"""io_uring answered ENOSYS in nspawn boxes, as sandtrap's Docker profile answers it (a kernel without io_uring).

systemd-nspawn 252 refuses what ``--system-call-filter=~`` names with EPERM only. So nspawn's own filter allows
io_uring, and a filter of sandtrap's, compiled here by libseccomp (:func:`io_uring_filter`), refuses it with
ENOSYS: ``launch.argv`` loads it (:data:`LOADER`, a few lines of the host's Python run by root, which may load
a filter without no_new_privs) just before it execs nspawn. nspawn, the box's PID 1 and every process of the box
inherit it; the kernel takes the strictest answer of all filters (ERRNO over nspawn's ALLOW), and nothing else
is refused by it (a neighbour such as pidfd_send_signal still reaches the kernel).
"""

from __future__ import annotations

import errno
import tempfile

import pyseccomp

from sandtrap.sandbox.docker.seccomp import IO_URING

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
    " sys.exit('loading the io_uring filter: '+os.strerror(ctypes.get_errno()))\n"
    "os.execvp(sys.argv[2],sys.argv[2:])\n"
)


def io_uring_filter(native: int | None = None) -> bytes:
    """The classic BPF program (``struct sock_filter`` array): io_uring_setup, _enter and _register answer
    ENOSYS on the native architecture and its compat ABIs; everything else is allowed (by this filter)."""
    arch = pyseccomp.system_arch() if native is None else native
    f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    if native is not None:
        f.remove_arch(pyseccomp.Arch.NATIVE)
        f.add_arch(arch)
    for compat in _COMPAT.get(arch, ()):
        f.add_arch(compat)
    for name in IO_URING:
        f.add_rule(pyseccomp.ERRNO(errno.ENOSYS), name)
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()
