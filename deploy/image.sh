#!/usr/bin/env bash
# Builds the honeypot's own image, sandtrap-honeypot, with no registry: the sandbox's Debian base image
# (sandtrap-base:<digest>, debootstrapped and `docker import`ed by `sandtrap image build`, python3 included) plus
# one layer holding sandtrap and its pinned dependencies (installed here with the virtualenv's pip into a
# directory, cached in <cache>/honeypot-<hash>/) and the installed seccomp profile. A no-op when its inputs
# (the base, pyproject.toml, src/) are unchanged.
# Usage: deploy/image.sh [TAG]   (default sandtrap-honeypot:latest; the set-up must have run: make setup)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TAG="${1:-sandtrap-honeypot:latest}"
VENV="${SANDTRAP_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
say() { printf '\033[1;34m[compose image]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[compose image] error:\033[0m %s\n' "$*" >&2; exit 1; }
[ -x "$PY" ] || die "no virtualenv at $VENV: run 'make setup' first"

SANDTRAP_ARGS=()
[ -n "${SANDTRAP_CONFIG:-}" ] && SANDTRAP_ARGS+=(--config "$SANDTRAP_CONFIG")
# The sandbox's base image (what debootstrap made, before the box's setup) and the cache directory.
read -r BASE CACHE < <(PYTHONPATH="$ROOT/src" "$PY" -c 'import sys
from sandtrap.app import cache_dir
from sandtrap.config import load_settings
from sandtrap.sandbox.docker.image import BASE_REPO
from sandtrap.sandbox.rootfs import rootfs_digest
s = load_settings(sys.argv[1] or None)
print(f"{BASE_REPO}:{rootfs_digest(s.image)[:12]}", cache_dir(s))' "${SANDTRAP_CONFIG:-}")
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  say "base image $BASE missing: building the sandbox image first (debootstrap, about 70 s the first time)"
  "$VENV/bin/sandtrap" "${SANDTRAP_ARGS[@]}" image build
  docker image inspect "$BASE" >/dev/null 2>&1 || die "$BASE is still missing after 'sandtrap image build'"
fi
PROFILE="$VENV/share/sandtrap/seccomp/sandtrap.json"
[ -f "$PROFILE" ] || die "no installed seccomp profile at $PROFILE: run 'make setup' first"

base_id="$(docker image inspect -f '{{.Id}}' "$BASE")"
inputs="$( { echo "$base_id"; sha256sum "$PROFILE" deploy/image.sh pyproject.toml;
  find src -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16)"
if [ "$(docker image inspect -f '{{index .Config.Labels "org.sandtrap.inputs"}}' "$TAG" 2>/dev/null || true)" = "$inputs" ]; then
  say "$TAG is current (inputs $inputs)"
  exit 0
fi

# The dependencies change with pyproject.toml only: installed once per its hash, kept in the
# cache; sandtrap's own package is copied fresh from src/ on every build (a superset of what pip would install).
DEPS_RECIPE=1  # raise when the way the dependencies are installed changes
deps="$( { sha256sum pyproject.toml; echo "$DEPS_RECIPE"; "$PY" -c 'import sys; print(sys.version_info[:2])'; } | sha256sum | cut -c1-16)"
STAGE="$CACHE/honeypot-$deps"
mkdir -p "$CACHE"  # a fresh clone whose sandbox image came from elsewhere has no cache directory yet
if [ ! -f "$STAGE/.complete" ]; then
  say "[1/3] installing sandtrap's dependencies into $STAGE/lib (pip, about a minute; cached for this pyproject.toml)"
  tmp="$(mktemp -d "$STAGE.tmp.XXXX")"
  "$VENV/bin/pip" install --quiet --progress-bar off --disable-pip-version-check --no-compile \
    --target "$tmp/lib" "$ROOT" 2>"$tmp/pip.log" || { tail -20 "$tmp/pip.log" >&2; die "pip install failed"; }
  rm -rf "$tmp/lib/bin" "$tmp/lib/sandtrap"  # entry points with this host's #! line; the package comes from src/
  touch "$tmp/.complete"
  rm -rf "$STAGE" && mv "$tmp" "$STAGE"  # whole or not at all (the cache is shared)
  # Older dependency sets (another pyproject.toml): the three newest stay, the rest go.
  ls -1dt "$CACHE"/honeypot-????????????????  | tail -n +4 | xargs -r rm -rf
else
  say "[1/3] reusing the dependencies in $STAGE/lib"
fi
# The build context: this build's own directory (hard links to the cached dependencies), removed afterwards.
CTX="$(mktemp -d "$CACHE/honeypot-build.XXXX")"
trap 'rm -rf "$CTX"' EXIT
cp -al "$STAGE/lib" "$CTX/lib"
mkdir -p "$CTX/pkg"
(cd src && tar -c --exclude=__pycache__ --exclude='*.pyc' sandtrap) | tar -x -C "$CTX/pkg"
cp "$PROFILE" "$CTX/sandtrap.json"
printf '%s\n' '#!/usr/bin/python3' 'import sys' '' 'from sandtrap.cli import main' '' 'sys.exit(main())' >"$CTX/sandtrap"
chmod 0755 "$CTX/sandtrap"

say "[2/3] writing the image recipe (FROM $BASE, a local image: nothing is pulled)"
cat >"$CTX/Dockerfile" <<EOF2
FROM $base_id
COPY lib /opt/sandtrap/lib
COPY pkg/sandtrap /opt/sandtrap/lib/sandtrap
COPY sandtrap.json /usr/share/sandtrap/seccomp/sandtrap.json
COPY sandtrap /usr/local/bin/sandtrap
# An unprivileged user for the honeypot, and the named volumes' mount points owned by it (a new named volume
# takes the ownership of the directory it is mounted over).
RUN useradd --system --uid 10022 --user-group --home-dir /var/lib/sandtrap --shell /usr/sbin/nologin sandtrap \\
 && mkdir -p /var/lib/sandtrap/log /var/lib/sandtrap/db /run/sandtrap \\
 && chown -R sandtrap:sandtrap /var/lib/sandtrap && chown root:sandtrap /run/sandtrap \\
 && chmod 0750 /var/lib/sandtrap /run/sandtrap
ENV PYTHONPATH=/opt/sandtrap/lib PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
LABEL org.sandtrap.inputs=$inputs org.sandtrap.role=honeypot
WORKDIR /var/lib/sandtrap
USER sandtrap
ENTRYPOINT ["/usr/local/bin/sandtrap"]
CMD ["run"]
EOF2

say "[3/3] building $TAG (one layer on $BASE, which the sandbox image shares)"
# The classic builder: FROM names a local image id, so nothing is looked up in a registry; no network for RUN.
DOCKER_BUILDKIT=0 docker build --quiet --network none --tag "$TAG" --file "$CTX/Dockerfile" \
  --label "org.sandtrap.inputs=$inputs" "$CTX" >"$CTX.log" 2>&1 || { tail -20 "$CTX.log" >&2; rm -f "$CTX.log"; die "docker build failed"; }
rm -f "$CTX.log"
say "$TAG built: $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}') (inputs $inputs)"
