#!/usr/bin/env bash
# The Compose deployment (README "Compose"): `deploy/compose.sh up` builds what it needs and starts it,
# `deploy/compose.sh down [--volumes]` stops it (with --volumes its data, logs and database go too).
# Environment: SANDTRAP_COMPOSE_PROJECT (default sandtrap), SANDTRAP_SSH_BIND/PORT (0.0.0.0:2222),
# SANDTRAP_API_BIND/PORT (127.0.0.1:8080), SANDTRAP_API_TOKEN (default: made once, in data/compose/api-token),
# SANDTRAP_COMPOSE_CONFIG (default deploy/sandtrap.yaml), SANDTRAP_HONEYPOT_IMAGE (sandtrap-honeypot:latest).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DATA="${SANDTRAP_DATA_DIR:-$ROOT/data}"
PROJECT="${SANDTRAP_COMPOSE_PROJECT:-sandtrap}"
export SANDTRAP_HONEYPOT_IMAGE="${SANDTRAP_HONEYPOT_IMAGE:-sandtrap-honeypot:latest}"
if [ -n "${SANDTRAP_COMPOSE_CONFIG:-}" ]; then
  SANDTRAP_COMPOSE_CONFIG="$(realpath "$SANDTRAP_COMPOSE_CONFIG")"
  export SANDTRAP_COMPOSE_CONFIG
fi
say() { printf '\033[1;34m[compose]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[compose] error:\033[0m %s\n' "$*" >&2; exit 1; }
command -v docker-compose >/dev/null 2>&1 || die "docker-compose is missing: run 'make compose-up' (its set-up installs it)"
compose() { docker-compose --project-name "$PROJECT" --file "$ROOT/deploy/compose.yaml" "$@"; }

is_loopback() { case "$1" in 127.*|::1|localhost) return 0;; *) return 1;; esac; }

token() {
  if [ -n "${SANDTRAP_API_TOKEN:-}" ]; then return; fi
  local file="$DATA/compose/api-token"
  if [ ! -s "$file" ]; then
    mkdir -p "$DATA/compose"
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$file")
    say "made an API token in $file (mode 0600)"
  fi
  SANDTRAP_API_TOKEN="$(cat "$file")"
  export SANDTRAP_API_TOKEN
}

case "${1:-}" in
  up)
    # The API is published on the host's loopback only, unless the operator chose a token to expose it with.
    if ! is_loopback "${SANDTRAP_API_BIND:-127.0.0.1}" && [ -z "${SANDTRAP_API_TOKEN:-}" ]; then
      die "SANDTRAP_API_BIND=${SANDTRAP_API_BIND} is not a loopback address: set SANDTRAP_API_TOKEN too (anyone reaching the API reads every session)"
    fi
    token
    bash "$ROOT/deploy/image.sh" "$SANDTRAP_HONEYPOT_IMAGE"
    say "starting project $PROJECT (engine-proxy, then honeypot)"
    compose up --detach --remove-orphans
    api="${SANDTRAP_API_BIND:-127.0.0.1}:${SANDTRAP_API_PORT:-8080}"
    is_loopback "${SANDTRAP_API_BIND:-127.0.0.1}" || api="127.0.0.1:${SANDTRAP_API_PORT:-8080}"
    for i in $(seq 1 120); do
      curl -fsS -o /dev/null "http://$api/healthz" 2>/dev/null && break
      [ $((i % 10)) = 0 ] && say "waiting for the honeypot ($i s; its log: docker-compose -p $PROJECT -f deploy/compose.yaml logs honeypot)"
      sleep 1
    done
    curl -fsS -o /dev/null "http://$api/healthz" || { compose logs --tail 30 honeypot >&2; die "the honeypot did not answer on $api within 120 s"; }
    say "up: SSH on ${SANDTRAP_SSH_BIND:-0.0.0.0}:${SANDTRAP_SSH_PORT:-2222}, API and web UI on http://$api (token: \$SANDTRAP_API_TOKEN or data/compose/api-token)"
    ;;
  down)
    token  # compose needs every variable the file names, also to take it down
    args=(--remove-orphans --timeout 60)
    [ "${2:-}" = "--volumes" ] && args+=(--volumes)
    say "stopping project $PROJECT${2:+ ($2)}"
    compose down "${args[@]}"
    ;;
  *)
    die "usage: deploy/compose.sh up | down [--volumes]"
    ;;
esac
