"""sandtrap's seccomp profile: the engine's default rules, with io_uring refused (README, Hardening).

Docker 20.10's default profile allows ``io_uring_setup``, ``io_uring_enter`` and ``io_uring_register``,
a large part of the kernel's attack surface. The set-up fetches that profile as data (Debian's
``golang-github-docker-docker-dev``, the engine's own source package) and :func:`derive` makes ours from
it: the three names taken out of every rule, and one rule of our own that answers them with ENOSYS, as a
kernel built without io_uring does. The engine then applies it to every process of a box (PID 1's tree,
every exec), with no filter of our own in the box and so no ``no_new_privs`` needed for one.

``sandbox.docker.seccomp_profile`` picks the profile: ``sandtrap`` (this one), ``default`` (the engine's own) or a
path. :func:`resolve` reads it once, at start-up. ``sandtrap`` is found by :func:`find`: a data dir's own
``<data_dir>/seccomp/sandtrap.json`` if it has one, else the installed one the set-up builds for every data dir
(:func:`installed_path`, under the installation's prefix: the virtualenv's ``share/sandtrap``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from sandtrap.errors import ConfigError

log = logging.getLogger(__name__)

SANDTRAP = "sandtrap"
ENGINE_DEFAULT = "default"
IO_URING = ("io_uring_setup", "io_uring_enter", "io_uring_register")
ENOSYS = 38  # on every architecture but MIPS, where the rule below does not apply
# Host architectures (as the engine names them in a rule's "arches") whose ENOSYS is not 38: there the
# three syscalls get the profile's default action (EPERM) instead.
MIPS = ["mips", "mipsle", "mipsel", "mips64", "mips64n32", "mipsel64", "mips3l64n32"]
REFUSING = {"SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP"}
FIX = (
    "run `make setup` in sandtrap's checkout (it installs the profile, derived from Docker's default one, "
    "for every data dir) or `sandtrap seccomp build --from <docker source>/profiles/seccomp/default.json`"
)


class ProfileError(ConfigError):
    """A seccomp profile that is not a usable JSON profile, or one that sandtrap refuses."""


def profile_path(data_dir: Path) -> Path:
    """A data dir's own copy of sandtrap's profile (optional; earlier set-ups wrote it there)."""
    return data_dir / "seccomp" / "sandtrap.json"


def installed_path() -> Path:
    """sandtrap's profile for every data dir, where the set-up builds it: beside the installation, not in a
    data dir (in the virtualenv, ``.venv/share/sandtrap/seccomp/sandtrap.json``)."""
    return Path(sys.prefix) / "share" / "sandtrap" / "seccomp" / "sandtrap.json"


def find(data_dir: Path | None) -> Path:
    """The file ``sandtrap`` means for ``data_dir``: its own if it has one, else (or for None) the installed one."""
    if data_dir is not None and profile_path(data_dir).exists():
        return profile_path(data_dir)
    return installed_path()


def io_uring_rule() -> dict[str, Any]:
    return {
        "names": list(IO_URING),
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": ENOSYS,
        "args": [],
        "comment": "sandtrap: ENOSYS for io_uring, as from a kernel built without it",
        "includes": {},
        "excludes": {"arches": MIPS},
    }


def _names(rule: dict[str, Any]) -> list[str]:
    return [*rule.get("names", []), *([rule["name"]] if rule.get("name") else [])]


def check_shape(profile: Any) -> dict[str, Any]:
    """``profile`` if it has the shape the engine reads (defaultAction, syscalls with names and an action)."""
    if not isinstance(profile, dict):
        raise ProfileError("a seccomp profile is a JSON object")
    if not isinstance(profile.get("defaultAction"), str):
        raise ProfileError("a seccomp profile needs a defaultAction")
    if profile["defaultAction"] not in REFUSING:
        raise ProfileError(f"a seccomp profile with defaultAction {profile['defaultAction']} shields nothing")
    rules = profile.get("syscalls")
    if not isinstance(rules, list) or not rules:
        raise ProfileError("a seccomp profile needs a non-empty syscalls list")
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or not isinstance(rule.get("action"), str):
            raise ProfileError(f"syscalls[{i}] is not an object with an action")
        names = rule.get("names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ProfileError(f"syscalls[{i}].names is not a list of syscall names")
        if not isinstance(rule.get("name", ""), str) or not _names(rule):
            raise ProfileError(f"syscalls[{i}] names no syscall")
    return profile


def allowed_io_uring(profile: dict[str, Any]) -> list[str]:
    """The io_uring syscalls some rule lets through (or the default action would, if no rule names them)."""
    out = []
    for name in IO_URING:
        actions = [r["action"] for r in profile["syscalls"] if name in _names(r)]
        if any(a not in REFUSING for a in actions or [profile["defaultAction"]]):
            out.append(name)
    return out


def derive(source: Any) -> dict[str, Any]:
    """sandtrap's profile from the engine's default one: io_uring out of every rule, our ENOSYS rule added."""
    profile = copy.deepcopy(check_shape(source))
    rules = []
    for rule in profile["syscalls"]:
        if rule.get("name") in IO_URING:
            del rule["name"]
        if "names" in rule:
            rule["names"] = [n for n in rule["names"] if n not in IO_URING]
        if _names(rule):
            rules.append(rule)
    profile["syscalls"] = [*rules, io_uring_rule()]
    left = allowed_io_uring(profile)
    if left:  # unreachable with the rule above; kept so no change to derive() can ship a profile that allows it
        raise ProfileError(f"the derived profile still allows {', '.join(left)}")
    return profile


def render(profile: dict[str, Any]) -> str:
    return json.dumps(profile, indent=1) + "\n"


def parse(text: str, where: str) -> dict[str, Any]:
    try:
        return check_shape(json.loads(text))
    except ValueError as exc:
        raise ProfileError(f"{where} is not JSON: {exc}") from None
    except ProfileError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def build(source: Path, target: Path) -> tuple[Path, bool]:
    """Write sandtrap's profile derived from ``source`` (Docker's default.json, or a profile derived before) to
    ``target`` (:func:`installed_path` for the set-up); (its path, whether it changed)."""
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot read {source}: {exc.strerror}") from None
    rendered = render(derive(parse(text, str(source))))
    try:
        if target.read_text(encoding="utf-8") == rendered:
            return target, False
    except OSError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".sandtrap.json.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(rendered)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target, True


def resolve(setting: str, data_dir: Path | None) -> str | None:
    """The profile's JSON text for the engine (``seccomp=<text>``), or None for the engine's own default.

    ``sandtrap`` (:func:`find`; ``data_dir`` None: the installed one only) must exist and refuse io_uring; another
    path must be a profile that refuses by default (one that allows io_uring is used, with a warning)."""
    key = "sandbox.docker.seccomp_profile"
    if setting == ENGINE_DEFAULT:
        log.warning("%s: default: the engine's own profile, which allows io_uring on Docker before 25.0", key)
        return None
    path = find(data_dir) if setting == SANDTRAP else Path(setting).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if setting == SANDTRAP:
            where = f"in neither {profile_path(data_dir)} nor {path}" if data_dir is not None else f"not at {path}"
            raise ProfileError(
                f"{key}: sandtrap's profile is missing ({where}, where the set-up installs it): {FIX}; "
                f"or set {key} to 'default' (the engine's own) or a path"
            ) from None
        raise ProfileError(f"{key}: {path} does not exist") from None
    except OSError as exc:
        raise ProfileError(f"{key}: cannot read {path}: {exc.strerror}") from None
    # A data dir's own file that is wrong shadows the installed one: removing it is a fix too.
    fix = FIX + (f", or remove {path} (the installed profile is used then)" if path != installed_path() else "")
    try:
        profile = parse(text, str(path))
    except ProfileError as exc:
        raise ProfileError(f"{key}: {exc}" + (f"; {fix}" if setting == SANDTRAP else "")) from None
    left = allowed_io_uring(profile)
    if left and setting == SANDTRAP:
        raise ProfileError(f"{key}: {path} allows {', '.join(left)}: {fix}")
    if left:
        log.warning("%s: %s allows %s", key, path, ", ".join(left))
    log.info("%s: %s, from %s", key, setting, path)
    return text
