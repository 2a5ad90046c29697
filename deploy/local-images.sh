#!/usr/bin/env bash
# Stand-in base images built from Debian packages, for machines that cannot pull the public images
# (python, redis, nginx, prometheus, grafana) but reach the Debian and PyPI mirrors; and the
# application images built on top of them. docker-compose.local.yml points every image at them.
#
#   deploy/local-images.sh          the stand-in base images (cached: an existing tag is skipped)
#   deploy/local-images.sh --app    the same, then the service and trainer images of this checkout
#                                   (always rebuilt; Docker's layer cache keeps that quick)
#
# Base images (tag prefix $MTRANK_LOCAL_PREFIX, default mtrank-local):
#   debian:bookworm   debootstrap --variant=minbase, imported once
#   python:3.11       Debian's python3.11 in a venv on PATH (pip installs need no --break-system-packages)
#   redis:7           Debian's redis-server (7.0) + redis-cli
#   nginx:1.22        Debian's nginx (1.22: deploy/nginx.conf avoids `server ... resolve`, >= 1.27.3)
#   prometheus:2      Debian's prometheus (2.42)
# Grafana is not packaged by Debian: the override runs a placeholder from the python image.
#
# Certificates: where a TLS-intercepting proxy sits between the containers and PyPI, the build
# needs the machine's CA bundle ($MTRANK_CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt).
# It is passed as a BuildKit secret (RUN --mount=type=secret): it is readable during that one RUN
# and never written to a layer. torch comes from the CPU wheel on this machine's disk
# ($MTRANK_TORCH_WHEEL, default: the torch-2.13.0+cpu wheel in pip's find-links /opt/wheels),
# copied into deploy/wheels/ (git-ignored) and bind-mounted into the trainer build.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${MTRANK_LOCAL_PREFIX:-mtrank-local}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA=${MTRANK_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WHEEL=${MTRANK_TORCH_WHEEL:-}
APP=0
for arg in "$@"; do
  case "$arg" in
    --app) APP=1 ;;
    *) echo "usage: $0 [--app]" >&2; exit 2 ;;
  esac
done

log() { echo "[local-images] $*" >&2; }

# A docker CLI that builds with BuildKit (RUN --mount, --secret): a buildx plugin, or a CLI older
# than 23 (its BuildKit client is built in; newer CLIs need buildx for DOCKER_BUILDKIT=1).
pick_cli() {
  local cli major
  for cli in ${DOCKER:-} docker /usr/bin/docker; do
    command -v "$cli" >/dev/null 2>&1 || continue
    if "$cli" buildx version >/dev/null 2>&1; then echo "$cli"; return; fi
    major=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
    if [[ "$major" =~ ^[0-9]+$ ]] && (( major < 23 )); then echo "$cli"; return; fi
  done
  echo "no docker CLI with BuildKit (install docker-buildx, or Debian's docker.io CLI)" >&2
  return 1
}
DOCKER=$(pick_cli)
export DOCKER_BUILDKIT=1
log "docker CLI: $DOCKER ($("$DOCKER" version --format '{{.Client.Version}}' 2>/dev/null))"

have() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

secret_args=()
if [[ -s "$CA" ]]; then secret_args=(--secret "id=ca,src=$CA"); fi

# -- debian:bookworm --------------------------------------------------------------------------
if have "$PREFIX/debian:bookworm"; then
  log "$PREFIX/debian:bookworm exists"
else
  command -v debootstrap >/dev/null || { echo "debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
  root=$(mktemp -d /var/tmp/mtrank-bookworm.XXXXXX)
  cleanup() { umount -l "$root/proc" "$root/sys" 2>/dev/null || true; rm -rf --one-file-system "$root"; }
  trap cleanup EXIT
  log "debootstrap bookworm from $MIRROR (once per machine)"
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" --one-file-system -c . | "$DOCKER" import --change 'CMD ["bash"]' - "$PREFIX/debian:bookworm" >/dev/null
  cleanup
  trap - EXIT
fi

# build NAME DOCKERFILE-TEXT: one stand-in image from the Debian base, skipped when tagged
build() {
  local tag="$PREFIX/$1"
  if have "$tag"; then log "$tag exists"; return; fi
  log "building $tag"
  printf '%s\n' "$2" | "$DOCKER" build -q -t "$tag" --build-arg "BASE=$PREFIX/debian:bookworm" - >/dev/null
}
APT='RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends'
CLEAN='&& rm -rf /var/lib/apt/lists/*'

build python:3.11 "ARG BASE
FROM \$BASE
$APT python3 python3-venv ca-certificates $CLEAN \\
 && python3 -m venv /usr/local/python
ENV PATH=/usr/local/python/bin:\$PATH LANG=C.UTF-8
CMD [\"python3\"]"

build redis:7 "ARG BASE
FROM \$BASE
$APT redis-server redis-tools $CLEAN && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
CMD [\"redis-server\"]"

build nginx:1.22 "ARG BASE
FROM \$BASE
$APT nginx-light wget $CLEAN \\
 && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
STOPSIGNAL SIGQUIT
CMD [\"nginx\", \"-g\", \"daemon off;\"]"

build prometheus:2 "ARG BASE
FROM \$BASE
$APT prometheus wget $CLEAN && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
WORKDIR /prometheus
ENTRYPOINT [\"/usr/bin/prometheus\"]
CMD [\"--config.file=/etc/prometheus/prometheus.yml\", \"--storage.tsdb.path=/prometheus\"]"

[[ $APP == 1 ]] || exit 0

# -- the application images -------------------------------------------------------------------
if [[ -z "$WHEEL" ]]; then
  WHEEL=$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -n1 || true)
fi
[[ -f "$WHEEL" ]] || { echo "no torch 2.13.0 CPU wheel (set MTRANK_TORCH_WHEEL)" >&2; exit 1; }
mkdir -p deploy/wheels
find deploy/wheels -name 'torch-*.whl' ! -name "$(basename "$WHEEL")" -delete
[[ -f "deploy/wheels/$(basename "$WHEEL")" ]] || cp "$WHEEL" deploy/wheels/

common=(--build-arg "PYTHON_IMAGE=$PREFIX/python:3.11" "${secret_args[@]}")
log "building $PREFIX/mtrank:trainer (torch from $(basename "$WHEEL"))"
"$DOCKER" build -q "${common[@]}" --target trainer --build-arg "TORCH_WHEEL=/wheels/$(basename "$WHEEL")" \
  -t "$PREFIX/mtrank:trainer" . >/dev/null
log "building $PREFIX/mtrank:service"
"$DOCKER" build -q "${common[@]}" --target service -t "$PREFIX/mtrank:service" . >/dev/null
log "done"
