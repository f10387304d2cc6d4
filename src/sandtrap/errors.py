"""One root error, a subclass per area. Third-party errors are translated where they enter."""

from __future__ import annotations


class SandtrapError(Exception):
    """Root of every error sandtrap raises on purpose."""


class ConfigError(SandtrapError):
    """The configuration file is missing, unreadable or invalid. The message names the key and the fix."""


class SandboxError(SandtrapError):
    """The sandbox backend failed (engine error, container gone, exec failed)."""


class SandboxUnavailable(SandboxError):
    """No sandbox can be had right now (engine down, global cap reached)."""


class SandboxCapReached(SandboxUnavailable):
    """``sandbox.max_sandboxes`` boxes are live: none can be made until one goes back."""


class ImageError(SandtrapError):
    """Building or checking the sandbox image failed."""


class EngineError(SandtrapError):
    """The container engine is unreachable or misconfigured."""
