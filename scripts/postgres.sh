#!/usr/bin/env bash
# Idempotent: a local PostgreSQL for sandtrap's storage tests (or a small deployment).
# Installs Debian's `postgresql` if missing (only as root on Debian), starts the cluster with
# pg_ctlcluster (no systemd needed), creates role `sandtrap` (password `sandtrap`, CREATEDB so the
# tests can make throw-away databases) and database `sandtrap_test`, then prints the URL on stdout.
# Everything else goes to stderr, so `URL=$(scripts/postgres.sh)` works.
set -euo pipefail

ROLE="${SANDTRAP_PG_ROLE:-sandtrap}"
PASSWORD="${SANDTRAP_PG_PASSWORD:-sandtrap}"
DB="${SANDTRAP_PG_DB:-sandtrap_test}"
CLUSTER="${SANDTRAP_PG_CLUSTER:-main}"

say() { printf '\033[1;34m[postgres]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[postgres] error:\033[0m %s\n' "$*" >&2; exit 1; }
is_debian() { [ -r /etc/os-release ] && grep -qiE '^(ID|ID_LIKE)=.*(debian|ubuntu)' /etc/os-release; }

# 1. The server packages.
if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! is_debian; then
    die "PostgreSQL is not installed. Install it (Debian/Ubuntu: apt-get install postgresql) and re-run."
  fi
  say "installing postgresql"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

# 2. A cluster (Debian's package creates one; make it if it was dropped).
VERSION="$(pg_lsclusters -h | awk -v c="$CLUSTER" '$2 == c {print $1; exit}')"
if [ -z "$VERSION" ]; then
  VERSION="$(ls /usr/lib/postgresql | sort -V | tail -n1)"
  [ "$(id -u)" = 0 ] || die "no PostgreSQL cluster '$CLUSTER'; run as root to create one"
  say "creating cluster $VERSION/$CLUSTER"
  pg_createcluster "$VERSION" "$CLUSTER" >/dev/null
fi
PORT="$(pg_lsclusters -h | awk -v c="$CLUSTER" -v v="$VERSION" '$1 == v && $2 == c {print $3; exit}')"

as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@"; else runuser -u postgres -- "$@"; fi
}

# 3. Running (a plain pg_ctlcluster start: works where no systemd runs).
if ! pg_lsclusters -h | awk -v c="$CLUSTER" -v v="$VERSION" '$1 == v && $2 == c {print $4}' | grep -q online; then
  say "starting cluster $VERSION/$CLUSTER on port $PORT"
  pg_ctlcluster "$VERSION" "$CLUSTER" start
fi
for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p "$PORT" && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$PORT" || die "PostgreSQL $VERSION/$CLUSTER does not answer on 127.0.0.1:$PORT"

# 4. Role and database (created only when missing).
psql_admin() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PORT" -d postgres "$@"; }
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
  say "creating role $ROLE"
  psql_admin -c "CREATE ROLE \"$ROLE\" LOGIN CREATEDB PASSWORD '$PASSWORD'"
fi
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
  say "creating database $DB"
  psql_admin -c "CREATE DATABASE \"$DB\" OWNER \"$ROLE\""
fi

echo "postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"
