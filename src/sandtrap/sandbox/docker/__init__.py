"""The Docker backend: hardened containers from the image ``sandtrap image build`` makes."""

from sandtrap.sandbox.docker.backend import DockerBackend

__all__ = ["DockerBackend"]
