#!/usr/bin/env bash
# Start and stop podman's Docker-compatible API service, so kfp.local.DockerRunner can run the
# pipeline's steps on a machine without a Docker daemon (images built by buildah live in the same
# containers-storage that podman runs them from).
#
#   images/podman.sh start         start the service in the background; prints DOCKER_HOST=unix://...
#   images/podman.sh stop          stop the service whose pid is in the pid file (never by name)
#   images/podman.sh status        exit 0 when the service of the pid file runs, else 3
#   images/podman.sh exec CMD...   run CMD against a Docker API: DOCKER_HOST when set, else the
#                                  Docker daemon when CONTAINER_TOOL=docker or (CONTAINER_TOOL unset)
#                                  'docker info' answers, else podman's service with DOCKER_HOST set
#                                  to its socket; a service exec starts is stopped after CMD (also
#                                  when CMD fails or is interrupted), one already running is kept
#   images/podman.sh driver        print the storage driver the service uses
#
# Settings (environment):
#   PODMAN_DIR        socket, pid file and service log (default: build/podman in the repository)
#   STORAGE_DRIVER    overlay or vfs; default: what podman picks, overlay where the kernel allows
#                     it (a container starts in ~0.3 s), else vfs (copies the whole image per
#                     container, ~6 s); the log says which. images/build.sh (buildah) picks the
#                     same store's driver, so the service sees the images it built.
#   CONTAINERS_CONF   podman settings (default: images/containers.conf: runc, cgroupfs, ulimits)
#   PODMAN_START_TIMEOUT  seconds to wait for the socket (default 30)
# The service is stopped by the process id it was started with (SIGTERM, then SIGKILL after 10 s),
# and only when that process is still the service this script started on this socket.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PODMAN_DIR="${PODMAN_DIR:-$REPO_ROOT/build/podman}"
SOCKET="$PODMAN_DIR/podman.sock"
PID_FILE="$PODMAN_DIR/service.pid"
SERVICE_LOG="$PODMAN_DIR/service.log"
PODMAN_START_TIMEOUT="${PODMAN_START_TIMEOUT:-30}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$IMAGES_DIR/containers.conf}"

# The storage driver podman uses. Unless STORAGE_DRIVER is set, podman picks it: the driver of an
# existing store, else overlay where the kernel supports it (and the store is not on overlayfs
# itself), else vfs. Passing --storage-driver explicitly is avoided because podman's database
# remembers how the store was first opened ("" = auto) and refuses a different explicit value
# ('database storage graph driver "" does not match our storage graph driver "overlay"').
service_driver() {
    if [[ -n "${STORAGE_DRIVER:-}" ]]; then
        case "$STORAGE_DRIVER" in
            overlay|vfs) printf '%s\n' "$STORAGE_DRIVER" ;;
            *) die "STORAGE_DRIVER=$STORAGE_DRIVER: use overlay or vfs" ;;
        esac
        return
    fi
    local driver
    driver="$(podman info --format '{{.Store.GraphDriverName}}')" \
        || die "'podman info' failed (CONTAINERS_CONF=$CONTAINERS_CONF)"
    [[ -n "$driver" ]] \
        || die "'podman info' reported no storage driver; set STORAGE_DRIVER=overlay or vfs"
    printf '%s\n' "$driver"
}

# The pid in the pid file when that process is the service this script started on $SOCKET.
service_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid cmdline
    pid="$(<"$PID_FILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || die "$PID_FILE does not hold a process id (got '$pid')"
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
    # A pid can be reused after the service died: only a 'podman ... system service' on our
    # socket counts.
    [[ "$cmdline" == *podman* && "$cmdline" == *"system service"* \
        && "$cmdline" == *"unix://$SOCKET"* ]] || return 1
    printf '%s\n' "$pid"
}

start_service() {
    local pid driver waited=0
    if pid="$(service_pid)"; then
        die "podman service already running (pid $pid, unix://$SOCKET); 'images/podman.sh stop' first"
    fi
    command -v podman >/dev/null 2>&1 || die "podman not found (Debian: apt-get install podman runc)"
    [[ -r "$CONTAINERS_CONF" ]] || die "CONTAINERS_CONF=$CONTAINERS_CONF is not readable"
    mkdir -p "$PODMAN_DIR"
    rm -f "$SOCKET" "$PID_FILE"
    driver="$(service_driver)"
    local driver_args=()
    [[ -z "${STORAGE_DRIVER:-}" ]] || driver_args=(--storage-driver "$STORAGE_DRIVER")
    # setsid: a Ctrl-C in the terminal reaches the pipeline run, which removes its containers
    # through this service, before the service itself is stopped.
    setsid podman "${driver_args[@]}" system service --time=0 "unix://$SOCKET" \
        </dev/null >>"$SERVICE_LOG" 2>&1 &
    pid=$!
    printf '%s\n' "$pid" >"$PID_FILE"
    until [[ -S "$SOCKET" ]]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PID_FILE"
            tail -n 20 "$SERVICE_LOG" >&2 || true
            die "podman system service (pid $pid) exited before creating $SOCKET; log: $SERVICE_LOG"
        fi
        if (( waited >= PODMAN_START_TIMEOUT * 10 )); then
            stop_service
            die "no socket $SOCKET after ${PODMAN_START_TIMEOUT} s; log: $SERVICE_LOG"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    local note=""
    [[ "$driver" == overlay ]] || note=" (no overlay: every container start copies its image, seconds per step)"
    log "podman service started: pid $pid, storage driver $driver$note, settings $CONTAINERS_CONF, log $SERVICE_LOG"
    printf 'DOCKER_HOST=unix://%s\n' "$SOCKET"
}

stop_service() {
    local pid waited=0
    if ! pid="$(service_pid)"; then
        if [[ -f "$PID_FILE" ]]; then
            log "pid $(<"$PID_FILE") in $PID_FILE is not a running podman service on $SOCKET; pid file removed"
            rm -f "$PID_FILE"
        else
            log "podman service not running (no $PID_FILE)"
        fi
        return 0
    fi
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do
        if (( waited >= 100 )); then
            log "podman service (pid $pid) still running 10 s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    # Reap it when this shell started it (exec); a no-op for a service started by another shell.
    wait "$pid" 2>/dev/null || true
    rm -f "$PID_FILE" "$SOCKET"
    log "podman service stopped (pid $pid)"
}

exec_with_api() {
    (( $# > 0 )) || die "exec needs a command: images/podman.sh exec CMD [ARGS...]"
    if [[ -n "${DOCKER_HOST:-}" ]]; then
        log "using DOCKER_HOST=$DOCKER_HOST"
        "$@"
        return
    fi
    local tool="${CONTAINER_TOOL:-}"
    if [[ -z "$tool" ]] && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        tool=docker
    fi
    if [[ "$tool" == docker ]]; then
        log "using the Docker daemon (CONTAINER_TOOL=docker or 'docker info' answers)"
        "$@"
        return
    fi
    local started="" pid
    if pid="$(service_pid)"; then
        log "using the running podman service (pid $pid); it is left running"
    else
        start_service >/dev/null
        started=1
    fi
    if [[ -n "$started" ]]; then
        trap stop_service EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
    fi
    local status=0
    DOCKER_HOST="unix://$SOCKET" "$@" || status=$?
    return "$status"
}

command="${1:-}"
[[ $# -gt 0 ]] && shift
case "$command" in
    start) start_service ;;
    stop) stop_service ;;
    status)
        if pid="$(service_pid)"; then
            log "podman service running: pid $pid, DOCKER_HOST=unix://$SOCKET"
        else
            log "podman service not running"
            exit 3
        fi
        ;;
    exec) exec_with_api "$@" ;;
    driver) service_driver ;;
    *) die "usage: images/podman.sh start | stop | status | exec CMD [ARGS...] | driver" ;;
esac
