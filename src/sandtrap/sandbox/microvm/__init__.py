"""The micro-VM backend: a QEMU VM per box, from the disk image ``sandtrap image build`` makes."""

from sandtrap.sandbox.microvm.backend import MicroVMBackend

__all__ = ["MicroVMBackend"]
