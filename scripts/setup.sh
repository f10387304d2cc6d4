#!/usr/bin/env bash
# Idempotent set-up for sandtrap: system packages, a Docker engine, the virtualenv, the sandbox image.
# Usage: scripts/setup.sh [run|test|compose]   ("test" also installs what the test suite drives; "compose" what
# `make compose-up` needs besides `run`'s: Debian's docker-compose).
# Every step checks first and does nothing when its result is already there.
set -euo pipefail

MODE="${1:-run}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DATA="${SANDTRAP_DATA_DIR:-$ROOT/data}"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
mkdir -p "$DATA/log"

say() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

is_debian() { [ -r /etc/os-release ] && grep -qiE '^(ID|ID_LIKE)=.*(debian|ubuntu)' /etc/os-release; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

APT_UPDATED=0
apt_install() {
  local missing=()
  for p in "$@"; do have_pkg "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! is_debian; then
    die "missing system packages: ${missing[*]}. Install them (Debian/Ubuntu: apt-get install ${missing[*]}) and re-run."
  fi
  say "installing system packages: ${missing[*]}"
  if [ "$APT_UPDATED" = 0 ]; then apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# 1. System packages the honeypot needs to build its image and run (libfuse3-3: `sandtrap loadavgfs`'s
#    libfuse, through the mfusepy package; lxcfs depends on it too).
PKGS=(debootstrap gcc libc6-dev ca-certificates libfuse3-3)
# sandbox.backend: microvm: QEMU (qemu-system-x86, qemu-utils for the overlays), e2fsprogs for `mkfs.ext4 -d`.
PKGS+=(qemu-system-x86 qemu-utils e2fsprogs iproute2 util-linux)
# sandbox.backend: nspawn: systemd-nspawn (run with --register=no --keep-unit: PID 1 need not be systemd).
PKGS+=(systemd-container)
# ...and its lure share (sandbox.microvm.lure): virtiofsd is QEMU 7.2's own on bookworm, in qemu-system-common
# (no separate virtiofsd package there); the lure daemon uses libfuse3-3 (above).
PKGS+=(qemu-system-common)
if [ "$MODE" = test ]; then
  PKGS+=(openssh-client sshpass tmux openssh-server nmap telnet curl tshark)  # nmap: the fingerprint test; tshark: the gateway's pcaps
fi
if [ "$MODE" = test ] || [ "$MODE" = compose ]; then
  PKGS+=(docker-compose)  # deploy/compose.yaml (README "Compose"); tests/integration/test_compose.py drives it
fi
apt_install "${PKGS[@]}"

# 1b. The unprivileged user QEMU becomes (sandbox.microvm.run_as) once its tap, disk and sockets are open.
if ! id sandtrap-qemu >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    say "creating the system user sandtrap-qemu (QEMU's, for sandbox.backend: microvm)"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin sandtrap-qemu
  else
    say "no user sandtrap-qemu (needed by sandbox.backend: microvm): run this as root to create it"
  fi
fi

# 2. A Docker engine that answers.
if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null 2>&1; then
    apt_install docker.io
  fi
  command -v docker >/dev/null 2>&1 || apt_install docker.io
  if [ "$(id -u)" != 0 ]; then
    die "no Docker engine answers and we are not root. Start one (e.g. 'sudo systemctl start docker') or run as root."
  fi
  say "starting dockerd in the background (log: $DATA/log/dockerd.log)"
  # Not a service manager's child: a plain background daemon that outlives this script.
  # LimitNOFILE=infinity as Debian's docker and containerd units set it: a box's open-files hard limit
  # cannot exceed the engine's, and a login on a real server has 524288 (sandbox.docker.ulimit_nofile_hard).
  setsid nohup sh -c 'ulimit -Hn 1048576 2>/dev/null; ulimit -Sn 1048576 2>/dev/null; exec dockerd --log-level=warn' \
    >>"$DATA/log/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 1 90); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || die "dockerd did not answer within 90 s; see $DATA/log/dockerd.log"
fi
say "docker engine: $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"

# 2b. lxcfs: /proc/meminfo, cpuinfo, ... inside a sandbox as its own limits show them (realism).
if [ -e /dev/fuse ]; then
  apt_install lxcfs
  # A mount left behind by an lxcfs that died ("Transport endpoint is not connected") is
  # detached first, otherwise nothing (not even mkdir) can use the path.
  if grep -q " /var/lib/lxcfs fuse" /proc/mounts \
      && { ! pgrep -x lxcfs >/dev/null || ! stat /var/lib/lxcfs/proc/meminfo >/dev/null 2>&1; }; then
    say "detaching a stale lxcfs mount on /var/lib/lxcfs"
    fusermount -uz /var/lib/lxcfs 2>/dev/null || umount -l /var/lib/lxcfs || true
  fi
  mkdir -p /var/lib/lxcfs
  if ! grep -q " /var/lib/lxcfs fuse" /proc/mounts; then
    # An lxcfs that is still shutting down holds its pid file and would make a new one exit at once.
    for _ in $(seq 1 20); do pgrep -x lxcfs >/dev/null || break; sleep 0.5; done
    say "starting lxcfs on /var/lib/lxcfs (log: $DATA/log/lxcfs.log)"
    setsid nohup lxcfs --enable-loadavg /var/lib/lxcfs >>"$DATA/log/lxcfs.log" 2>&1 < /dev/null &
    lxcfs_pid=$!
    for _ in $(seq 1 20); do [ -e /var/lib/lxcfs/proc/meminfo ] && break; sleep 0.5; done
    sleep 0.5
    kill -0 "$lxcfs_pid" 2>/dev/null && [ -e /var/lib/lxcfs/proc/meminfo ] \
      || die "lxcfs did not start (see $DATA/log/lxcfs.log); stop any other lxcfs and run the set-up again"
  fi
else
  say "no /dev/fuse: lxcfs not started (sandboxes will show the host's /proc/meminfo)"
fi

# 3. The virtualenv with pinned dependencies (re-installed when pyproject.toml changes).
if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c 'import ensurepip' >/dev/null 2>&1; then
  apt_install python3-venv
fi
STAMP="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  say "creating virtualenv and installing dependencies"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e ".[dev]"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi

SANDTRAP_ARGS=()
[ -n "${SANDTRAP_CONFIG:-}" ] && SANDTRAP_ARGS+=(--config "$SANDTRAP_CONFIG")

# 3b. sandtrap's own /proc/loadavg for the boxes (`sandtrap loadavgfs`, a FUSE file system in the package on
#     libfuse3-3, step 1): each box's tasks, load and newest pid, bound over lxcfs's.
#     Started as lxcfs is; a dead mount of it is detached by the daemon itself.
if [ -e /dev/fuse ] && [ "$(id -u)" = 0 ]; then
  LOADAVG_DIR="$("$VENV/bin/python" -c 'import sys
from sandtrap.config import load_settings
print(load_settings(sys.argv[1] or None).sandbox.loadavg_dir)' "${SANDTRAP_CONFIG:-}")"
  # One left by an older sandtrap whose file system type differs from this one's (what boxes read in
  # /proc/mounts): stopped and detached, then started again below.
  want="$("$VENV/bin/python" -c 'from sandtrap.sandbox.host.loadavgfs import FSTYPE; print(FSTYPE)' 2>/dev/null || true)"
  have="$([ -n "$LOADAVG_DIR" ] && findmnt -no FSTYPE --mountpoint "$LOADAVG_DIR" 2>/dev/null | head -1 || true)"
  if [ -n "$want" ] && [ -n "$have" ] && [ "$have" != "$want" ]; then
    say "sandtrap loadavgfs on $LOADAVG_DIR is an older one ($have, not $want): restarting it"
    pkill -f " loadavgfs $LOADAVG_DIR\$" || true
    umount -l "$LOADAVG_DIR" 2>/dev/null || true
  fi
  if [ -n "$LOADAVG_DIR" ] && ! stat "$LOADAVG_DIR/proc/loadavg" >/dev/null 2>&1; then
    say "starting sandtrap loadavgfs on $LOADAVG_DIR (log: $DATA/log/loadavgfs.log)"
    setsid nohup "$VENV/bin/sandtrap" "${SANDTRAP_ARGS[@]}" loadavgfs "$LOADAVG_DIR" \
      >>"$DATA/log/loadavgfs.log" 2>&1 < /dev/null &
    loadavg_pid=$!
    for _ in $(seq 1 20); do [ -e "$LOADAVG_DIR/proc/loadavg" ] && break; sleep 0.5; done
    kill -0 "$loadavg_pid" 2>/dev/null && [ -e "$LOADAVG_DIR/proc/loadavg" ] \
      || die "sandtrap loadavgfs did not start (see $DATA/log/loadavgfs.log)"
  fi
else
  say "no /dev/fuse or not root: sandtrap loadavgfs not started (sandboxes will show lxcfs's /proc/loadavg)"
fi

# 4. For the test suite: a local PostgreSQL (the storage tests run against SQLite and PostgreSQL).
if [ "$MODE" = test ]; then
  say "postgresql: $(bash scripts/postgres.sh)"
fi

# 5. Web UI assets (asciinema-player, chart library) from the npm registry, served offline.
bash scripts/web-assets.sh
if [ "$MODE" = test ]; then
  bash scripts/chromium.sh  # headless Chromium for the web UI tests
fi

# 6. sandtrap's seccomp profile: Docker's default rules with io_uring refused (README "Hardening"), installed
#    once for every data dir in .venv/share/sandtrap/seccomp/sandtrap.json (a data dir may hold its own copy,
#    <data_dir>/seccomp/sandtrap.json, used first). Docker's default.json comes as data from Debian's package of
#    the engine's source, the version of the installed docker.io when there is one; nothing of it is installed.
#    A profile an earlier set-up left in $DATA/seccomp is installed instead, with nothing fetched.
EARLIER_PROFILE="$DATA/seccomp/sandtrap.json"
if "$VENV/bin/sandtrap" "${SANDTRAP_ARGS[@]}" seccomp check --installed >/dev/null 2>&1; then
  say "seccomp profile: present"
elif [ -f "$EARLIER_PROFILE" ] && "$VENV/bin/sandtrap" seccomp build --from "$EARLIER_PROFILE" \
    && "$VENV/bin/sandtrap" "${SANDTRAP_ARGS[@]}" seccomp check --installed >/dev/null 2>&1; then
  say "seccomp profile: installed from $EARLIER_PROFILE (an earlier set-up's)"
else
  DOCKER_SRC_PKG=golang-github-docker-docker-dev
  if [ "$(id -u)" != 0 ] || ! is_debian; then
    die "sandtrap's seccomp profile is missing. On Debian/Ubuntu as root this step fetches $DOCKER_SRC_PKG; elsewhere run
  sandtrap seccomp build --from <docker source>/profiles/seccomp/default.json
or set sandbox.docker.seccomp_profile: default (the engine's own profile, which allows io_uring before Docker 25)."
  fi
  want="$DOCKER_SRC_PKG"
  engine_src="$(dpkg-query -W -f='${source:Version}' docker.io 2>/dev/null || true)"
  [ -n "$engine_src" ] && want="$DOCKER_SRC_PKG=$engine_src"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  id _apt >/dev/null 2>&1 && chown _apt "$tmp"  # apt downloads as _apt when it may
  say "seccomp profile: fetching Docker's default profile ($want, about 1 MB)"
  fetch() { (cd "$tmp" && apt-get download -q "$1") >"$tmp/apt.log" 2>&1; }
  if ! fetch "$want"; then
    if [ "$APT_UPDATED" = 0 ]; then apt-get update -qq; APT_UPDATED=1; fi
    if ! fetch "$want" && [ "$want" != "$DOCKER_SRC_PKG" ]; then
      say "seccomp profile: $want is not in the package lists; taking the candidate version"
      fetch "$DOCKER_SRC_PKG" || die "apt-get download $DOCKER_SRC_PKG failed: $(tail -3 "$tmp/apt.log")"
    fi
  fi
  deb="$(ls "$tmp"/*.deb 2>/dev/null | head -1 || true)"
  [ -n "$deb" ] || die "apt-get download $want failed: $(tail -3 "$tmp/apt.log")"
  dpkg-deb -x "$deb" "$tmp/x"
  src="$tmp/x/usr/share/gocode/src/github.com/docker/docker/profiles/seccomp/default.json"
  [ -f "$src" ] || die "$(basename "$deb") has no profiles/seccomp/default.json"
  "$VENV/bin/sandtrap" seccomp build --from "$src"
  rm -rf "$tmp"
  trap - EXIT
fi

# 7. The sandbox image (a no-op when its inputs are unchanged).
"$VENV/bin/sandtrap" "${SANDTRAP_ARGS[@]}" image build
say "ready"
