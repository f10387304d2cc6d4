#!/usr/bin/env bash
# Idempotent: Debian's Chromium at /usr/bin/chromium, which the web UI's browser test drives headless.
# (Playwright's own browser download cannot work here; the test uses this binary instead.)
set -euo pipefail

say() { printf '\033[1;34m[chromium]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[chromium] error:\033[0m %s\n' "$*" >&2; exit 1; }

if [ -x /usr/bin/chromium ]; then
  say "$(/usr/bin/chromium --version 2>/dev/null || echo 'present') at /usr/bin/chromium"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! { [ -r /etc/os-release ] && grep -qiE '^(ID|ID_LIKE)=.*(debian|ubuntu)' /etc/os-release; }; then
  die "/usr/bin/chromium is missing. Install Chromium (Debian: apt-get install chromium) and re-run."
fi
say "installing chromium"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
[ -x /usr/bin/chromium ] || die "apt-get installed chromium but /usr/bin/chromium is still missing"
say "$(/usr/bin/chromium --version 2>/dev/null) at /usr/bin/chromium"
