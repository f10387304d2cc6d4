#!/usr/bin/env bash
# Idempotent: puts the web UI's front-end packages (asciinema-player) into src/sandtrap/api/web/static/vendor/.
# Does nothing when static/vendor/ is newer than package-lock.json. Otherwise runs `npm ci` in a build
# directory (never in the source tree) and copies only the dist files the pages load. Nothing is fetched
# at run time: the UI serves every asset from /static.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WEB="$ROOT/src/sandtrap/api/web"
VENDOR="$WEB/static/vendor"
LOCK="$WEB/package-lock.json"
STAMP="$VENDOR/.stamp"

say() { printf '\033[1;34m[web-assets]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[web-assets] error:\033[0m %s\n' "$*" >&2; exit 1; }

is_debian() { [ -r /etc/os-release ] && grep -qiE '^(ID|ID_LIKE)=.*(debian|ubuntu)' /etc/os-release; }

[ -f "$LOCK" ] || die "$LOCK is missing"

# Every file the pages load, as <path inside node_modules> <name in static/vendor>.
FILES=(
  "asciinema-player/dist/bundle/asciinema-player.min.js asciinema-player.min.js"
  "asciinema-player/dist/bundle/asciinema-player.css asciinema-player.css"
  "asciinema-player/LICENSE asciinema-player.LICENSE"
)

up_to_date() {
  [ -f "$STAMP" ] || return 1
  [ "$STAMP" -nt "$LOCK" ] || return 1
  [ "$STAMP" -nt "$WEB/package.json" ] || return 1
  local entry
  for entry in "${FILES[@]}"; do
    [ -s "$VENDOR/${entry#* }" ] || return 1
  done
}

if up_to_date; then
  say "static/vendor is up to date"
  exit 0
fi

if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && is_debian; then
    say "installing nodejs and npm"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  else
    die "node and npm are needed to fetch the web UI's packages. Install them (Debian/Ubuntu: apt-get install nodejs npm) and re-run."
  fi
fi

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/sandtrap-web.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT
cp "$WEB/package.json" "$LOCK" "$BUILD/"
say "npm ci (asciinema-player) in $BUILD"
(cd "$BUILD" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error) \
  || die "npm ci failed; check that the npm registry is reachable"

# Copy into a fresh directory, then swap it in, so a failure never leaves a half-filled vendor dir.
NEW="$WEB/static/.vendor.new"
rm -rf "$NEW"
mkdir -p "$NEW"
for entry in "${FILES[@]}"; do
  src="$BUILD/node_modules/${entry%% *}"
  [ -s "$src" ] || die "expected $src after npm ci; did the package's layout change?"
  cp "$src" "$NEW/${entry#* }"
done
touch "$NEW/.stamp"
rm -rf "$VENDOR"
mv "$NEW" "$VENDOR"
say "copied $(( ${#FILES[@]} )) files into ${VENDOR#"$ROOT"/}"
