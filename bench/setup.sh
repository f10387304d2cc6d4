#!/usr/bin/env bash
# Idempotent set-up for the benchmark harness (`make bench` runs `make setup` first, then this).
#
#  1. Debian's openssh-server (for /usr/sbin/sshd), installed without starting its service: the
#     harness runs its own sshd on 127.0.0.1 with a throw-away config, nothing else listens.
#  2. A test user for that sshd (shell /bin/bash, password locked; each run sets a random password
#     and locks it again when it ends).
#  3. Cowrie from PyPI in its own throw-away virtualenv under bench/.work/ (gitignored), built on
#     Debian's python3 so the unprivileged test user can run it (Cowrie refuses to run as root).
#  4. The harness's own dependencies (the `bench` extras of pyproject.toml) in the project's .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
WORK="$ROOT/bench/.work"
VENV="$ROOT/.venv"
COWRIE_VENV="$WORK/cowrie-venv"
COWRIE_VERSION="${COWRIE_VERSION:-3.1.4}"
BENCH_USER="${BENCH_USER:-sandtrap-bench}"
mkdir -p "$WORK"

say() { printf '\033[1;34m[bench-setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[bench-setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages, adds a test user and runs sshd)"
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# 1. sshd, never started by the package: a policy-rc.d that refuses service starts during the install.
if [ ! -x /usr/sbin/sshd ]; then
  say "installing openssh-server (its service is not started)"
  POLICY=/usr/sbin/policy-rc.d
  ADDED_POLICY=0
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    ADDED_POLICY=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server >/dev/null
  [ "$ADDED_POLICY" = 1 ] && rm -f "$POLICY"
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true  # we installed it: keep it off
  fi
fi
mkdir -p /run/sshd && chmod 755 /run/sshd
say "sshd: $(/usr/sbin/sshd -V 2>&1 | head -1)"

# 2. The test user (password locked until a run sets one).
if ! id "$BENCH_USER" >/dev/null 2>&1; then
  say "adding test user $BENCH_USER (password locked)"
  useradd --create-home --shell /bin/bash --user-group "$BENCH_USER"
fi
passwd -l "$BENCH_USER" >/dev/null 2>&1 || true

# 3. Cowrie in its own virtualenv, on Debian's python3 (readable by the test user).
SYS_PY=/usr/bin/python3
if ! "$SYS_PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
COWRIE_STAMP="$COWRIE_VENV/.installed-cowrie-$COWRIE_VERSION"
if [ ! -f "$COWRIE_STAMP" ]; then
  say "installing cowrie==$COWRIE_VERSION into $COWRIE_VENV"
  rm -rf "$COWRIE_VENV"
  "$SYS_PY" -m venv "$COWRIE_VENV"
  "$COWRIE_VENV/bin/pip" install -q "cowrie==$COWRIE_VERSION" 2>&1 | grep -v '^WARNING: Location' || true
  "$COWRIE_VENV/bin/python" -c 'import cowrie' || die "cowrie did not install"
  touch "$COWRIE_STAMP"
fi
chmod -R a+rX "$COWRIE_VENV"
say "cowrie: $("$COWRIE_VENV/bin/python" -c 'import cowrie._version as v; print(v.__version__)')"

# 4. The harness's dependencies in the project's virtualenv (re-installed when pyproject.toml changes).
BENCH_STAMP="$VENV/.bench-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$BENCH_STAMP" ]; then
  say "installing the bench extras (matplotlib, psutil, py-spy, pyinstrument) into .venv"
  "$VENV/bin/pip" install -q -e ".[bench]" 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -c 'import matplotlib, psutil' || die "bench extras did not install"
  rm -f "$VENV"/.bench-installed-*
  touch "$BENCH_STAMP"
fi
say "ready"
