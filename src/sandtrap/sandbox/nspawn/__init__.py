"""``sandbox.backend: nspawn``: a systemd-nspawn container per box, an overlay on the image's tree."""

from sandtrap.sandbox.nspawn.backend import NspawnBackend

__all__ = ["NspawnBackend"]
