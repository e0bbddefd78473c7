#!/usr/bin/env bash
# Build the atomo image with a private Docker engine, offline apart from Debian's mirror and PyPI on the host:
# a base image made with debootstrap (bookworm, python3, venv, CA certificates) and `docker import`, the
# project's dependencies downloaded on the host into .docker-cache/wheels, the classic builder.
#
#   scripts/docker-image.sh build          start a private engine (unless one of ours is running), make the
#                                          base image and the wheels when missing, build the image; an engine
#                                          this command started is stopped when it ends, whatever happens
#   scripts/docker-image.sh engine-start   start the private engine and leave it running (prints its pid)
#   scripts/docker-image.sh engine-stop    stop it (by the pid in its pid file)
#
# The engine runs with --bridge=none --iptables=false, so the host's network is left as it was: run containers
# with --network host. Its socket: unix:///tmp/atomo-docker/docker.sock (export DOCKER_HOST to use it).
# Environment:
#   ATOMO_IMAGE          the tag to build (default atomo:local)
#   ATOMO_TORCH_SPEC     the torch requirement (default torch==2.13.0: the build pip picks on this host)
#   ATOMO_TORCHVISION    a torchvision requirement (default empty: PyPI's torchvision does not import with
#                        the CPU torch build; the Dockerfile's default build installs it)
#   ATOMO_DEBIAN_MIRROR  Debian mirror for debootstrap (default http://deb.debian.org/debian)
# Caches (git-ignored): .docker-cache/engine (the engine's images and build cache), .docker-cache/wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
CACHE="$ROOT/.docker-cache"
RUN_DIR="/tmp/atomo-docker"   # short: the socket path and the engine's exec root must stay short
SOCK="$RUN_DIR/docker.sock"
PIDFILE="$RUN_DIR/docker.pid"
export DOCKER_HOST="unix://$SOCK"
DOCKER="docker"
[ -x /usr/bin/docker ] && DOCKER=/usr/bin/docker   # the client from the engine's own package

IMAGE="${ATOMO_IMAGE:-atomo:local}"
TORCH_SPEC="${ATOMO_TORCH_SPEC:-torch==2.13.0}"
TORCHVISION_SPEC="${ATOMO_TORCHVISION:-}"
MIRROR="${ATOMO_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_IMAGE="atomo-base/debian-python:bookworm"
WHEELS_REL=".docker-cache/wheels"   # relative to the build context (the repository root)
DUMB_INIT="dumb-init==1.2.5.post1"  # keep in step with the Dockerfile

log() { echo "docker-image: $*" >&2; }
die() { log "$*"; exit 1; }

engine_alive() {
    [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && "$DOCKER" version >/dev/null 2>&1
}

engine_start() {
    if engine_alive; then
        log "engine already running (pid $(cat "$PIDFILE"))"
        cat "$PIDFILE"
        return 0
    fi
    command -v dockerd >/dev/null || die "dockerd not found: run scripts/install-test-tools.sh (Debian package docker.io)"
    mkdir -p "$RUN_DIR" "$CACHE/engine"
    rm -f "$PIDFILE" "$SOCK"
    log "starting dockerd (log: $RUN_DIR/dockerd.log)"
    dockerd --host "$DOCKER_HOST" --data-root "$CACHE/engine" --exec-root "$RUN_DIR/exec" --pidfile "$PIDFILE" \
        --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
        >"$RUN_DIR/dockerd.log" 2>&1 </dev/null &
    local pid=$! i
    for i in $(seq 1 120); do
        if "$DOCKER" version >/dev/null 2>&1; then
            echo "$pid" >"$PIDFILE"
            log "engine up (pid $pid)"
            echo "$pid"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            log "dockerd exited at start; the end of its log:"
            tail -n 20 "$RUN_DIR/dockerd.log" >&2
            exit 1
        fi
        sleep 0.5
    done
    kill "$pid" 2>/dev/null || true
    log "dockerd did not answer within 60 s; the end of its log:"
    tail -n 20 "$RUN_DIR/dockerd.log" >&2
    exit 1
}

engine_stop() {
    [ -f "$PIDFILE" ] || { log "no engine pid file ($PIDFILE)"; return 0; }
    local pid i
    pid="$(cat "$PIDFILE")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then log "dockerd (pid $pid) ignored SIGTERM for 30 s: SIGKILL"; kill -KILL "$pid"; fi
        log "engine stopped (pid $pid)"
    fi
    rm -f "$PIDFILE"
}

make_base() {
    if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE present"
        return 0
    fi
    command -v debootstrap >/dev/null || die "debootstrap not found: run scripts/install-test-tools.sh"
    local rootfs start=$SECONDS
    rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
    log "making $BASE_IMAGE with debootstrap from $MIRROR"
    if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" \
        >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2
        rm -rf "$rootfs"
        die "debootstrap failed (log: $CACHE/debootstrap.log)"
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$DOCKER" import - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "base image made in $((SECONDS - start)) s"
}

download_wheels() {
    local key start=$SECONDS
    key="$( { cat pyproject.toml; echo "$TORCH_SPEC $TORCHVISION_SPEC $DUMB_INIT"; python -V; } | sha256sum | cut -c1-16)"
    if [ -f "$CACHE/wheels.key" ] && [ "$(cat "$CACHE/wheels.key")" = "$key" ] && [ -d "$ROOT/$WHEELS_REL" ]; then
        log "wheels present ($WHEELS_REL)"
        return 0
    fi
    # The wheels are for the host's Python; the base's must be the same minor version.
    local host_py base_py
    host_py="$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    base_py="$("$DOCKER" run --rm --network none "$BASE_IMAGE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    [ "$host_py" = "$base_py" ] || die "the host's Python is $host_py but the base image's is $base_py: run this with a Python $base_py"
    log "downloading wheels into $WHEELS_REL"
    rm -rf "$ROOT/$WHEELS_REL.new" "$CACHE/wheels.key"
    # setuptools: the project's build backend, for the build inside the image (pip's isolated build, no index).
    # shellcheck disable=SC2086
    python -m pip download --quiet --disable-pip-version-check --dest "$ROOT/$WHEELS_REL.new" \
        "$TORCH_SPEC" ${TORCHVISION_SPEC:+"$TORCHVISION_SPEC"} ".[kubernetes]" "$DUMB_INIT" "setuptools>=68"
    rm -rf "$ROOT/$WHEELS_REL"
    mv "$ROOT/$WHEELS_REL.new" "$ROOT/$WHEELS_REL"
    echo "$key" >"$CACHE/wheels.key"
    log "wheels downloaded in $((SECONDS - start)) s ($(du -sh "$ROOT/$WHEELS_REL" | cut -f1))"
}

build() {
    local start=$SECONDS old
    old="$("$DOCKER" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
    log "building $IMAGE (classic builder)"
    DOCKER_BUILDKIT=0 "$DOCKER" build --quiet --tag "$IMAGE" \
        --build-arg "BASE=$BASE_IMAGE" \
        --build-arg "TORCH_SPEC=$TORCH_SPEC" \
        --build-arg "TORCHVISION_SPEC=$TORCHVISION_SPEC" \
        --build-arg "WHEELS=$WHEELS_REL" \
        . >/dev/null
    log "built $IMAGE in $((SECONDS - start)) s ($("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE") bytes)"
    # The image this tag named before, now untagged: removed, so the engine's folder does not grow with each
    # change (the build cache stays). One a container still uses is kept.
    if [ -n "$old" ] && [ "$old" != "$("$DOCKER" image inspect --format '{{.Id}}' "$IMAGE")" ]; then
        "$DOCKER" image rm "$old" >/dev/null 2>&1 || log "kept the previous image $old (in use)"
    fi
}

case "${1:-}" in
    engine-start) engine_start ;;
    engine-stop) engine_stop ;;
    build)
        mkdir -p "$CACHE"
        if ! engine_alive; then
            trap engine_stop EXIT
            engine_start >/dev/null
        fi
        make_base
        download_wheels
        build
        ;;
    *) echo "usage: $0 build | engine-start | engine-stop" >&2; exit 2 ;;
esac
