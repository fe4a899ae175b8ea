#!/usr/bin/env bash
# Make a Docker engine answer on this host and provide the base image the Dockerfile builds on.
#
#   deploy/docker/engine.sh      # prints `PYTHON_IMAGE=<image>` on its last line
#
# Idempotent and cached: an engine that already answers is used as it is; the engine's data folder
# (/var/lib/docker) keeps the base image and every build layer between runs.
#   1. `docker info` fails -> install Debian's docker.io (apt, as root) if dockerd is missing, then start
#      dockerd without iptables or a default bridge (hosts and CI containers without NET_ADMIN lack both;
#      compose's user-defined networks and published ports still work).
#   2. python:3.11-slim-bookworm present or pullable -> use it. Otherwise (no registry reachable) build a
#      stand-in with the same Debian and Python: debootstrap bookworm from the host's apt mirror, import it, and
#      add deploy/docker/base.Dockerfile on top (~1 min, once).
set -euo pipefail

OFFICIAL=python:3.11-slim-bookworm
STANDIN=local/python:3.11-slim-bookworm
DEBIAN_IMAGE=local/debian:bookworm
HERE=$(cd "$(dirname "$0")" && pwd)
# Debian's client talks to Debian's engine; a newer client first on PATH may lack the buildx plugin.
DOCKER=${DOCKER:-$(if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker; fi)}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/nnserve-dockerd.log}

log() { echo "engine.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" -ne 0 ]; then
        log "needs root for: $*"
        exit 2
    fi
}

start_engine() {
    if "$DOCKER" info >/dev/null 2>&1; then
        return
    fi
    if ! command -v dockerd >/dev/null; then
        as_root "apt-get install docker.io"
        log "installing docker.io"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
        DOCKER=/usr/bin/docker
    fi
    as_root "dockerd"
    log "starting dockerd (log: $DOCKERD_LOG)"
    nohup dockerd --iptables=false --ip6tables=false --bridge=none >"$DOCKERD_LOG" 2>&1 &
    for _ in $(seq 60); do
        if "$DOCKER" info >/dev/null 2>&1; then
            return
        fi
        sleep 1
    done
    log "dockerd did not answer within 60 s; see $DOCKERD_LOG"
    exit 1
}

apt_mirror() {
    # The first deb822 or one-line source of the host: the mirror that debootstrap reads bookworm from.
    sed -n 's/^URIs: *\([^ ]*\).*/\1/p; s/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\) bookworm .*/\2/p' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | grep -v security | head -n 1
}

build_standin() {
    local rootfs context mirror
    as_root "debootstrap"
    command -v debootstrap >/dev/null || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    if ! "$DOCKER" image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
        mirror=$(apt_mirror)
        rootfs=$(mktemp -d)
        log "debootstrap bookworm from ${mirror:-the default mirror} (about a minute)"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
            ${mirror:+"$mirror"} >/dev/null
        tar -C "$rootfs" -c . | "$DOCKER" import - "$DEBIAN_IMAGE" >/dev/null
        rm -rf "$rootfs"
    fi
    context=$(mktemp -d)
    cp "$HERE/base.Dockerfile" "$context/Dockerfile"
    cp /etc/ssl/certs/ca-certificates.crt "$context/"
    DOCKER_BUILDKIT=0 "$DOCKER" build -q --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" -t "$STANDIN" "$context" >/dev/null
    rm -rf "$context"
}

base_image() {
    if "$DOCKER" image inspect "$OFFICIAL" >/dev/null 2>&1; then
        echo "$OFFICIAL"
    elif "$DOCKER" image inspect "$STANDIN" >/dev/null 2>&1; then
        echo "$STANDIN"
    elif timeout 60 "$DOCKER" pull -q "$OFFICIAL" >/dev/null 2>&1; then
        echo "$OFFICIAL"
    else
        log "$OFFICIAL cannot be pulled: building the stand-in $STANDIN"
        build_standin
        echo "$STANDIN"
    fi
}

free_space() {
    # Every rebuild of the train image leaves gigabytes of build cache behind: a disk that fills up fails the next
    # build half-way ("No space left on device"). Below MIN_FREE_GB, drop the cache (the images themselves stay).
    local root free
    root=$("$DOCKER" info --format '{{.DockerRootDir}}')
    free=$(df --output=avail -BG "$root" | tail -n 1 | tr -dc 0-9)
    if [ "$free" -lt "${MIN_FREE_GB:-30}" ]; then
        log "${free} GB free under $root: pruning the build cache"
        "$DOCKER" builder prune --all --force >/dev/null
        "$DOCKER" image prune --force >/dev/null
    fi
}

start_engine
free_space
echo "PYTHON_IMAGE=$(base_image)"
