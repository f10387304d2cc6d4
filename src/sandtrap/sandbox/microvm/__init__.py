"""The micro-VM backend: a QEMU VM per box, from the disk image ``sandtrap image build`` makes
(``backend.MicroVMBackend``). Nothing is imported here: the lure file system daemon (``lurefs``) runs as
``python -m`` from this package and loads only what it needs."""
