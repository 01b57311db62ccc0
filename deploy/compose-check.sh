#!/usr/bin/env bash
# The container cluster, built and run for real on this machine:
#
#   sudo bash deploy/compose-check.sh                 # this machine's architecture: compose, then Swarm
#   sudo bash deploy/compose-check.sh --arch arm64    # the arm64 image under qemu emulation (slow)
#   sudo bash deploy/compose-check.sh --no-swarm      # compose only
#
# 1. Installs what it needs (deploy/install-system-deps.sh docker) and starts dockerd if no engine
#    answers (its log: ~/.cache/edgellm/dockerd.log).
# 2. Builds the image from deploy/Dockerfile. Its base is python:3.11-slim-bookworm when that can
#    be pulled; otherwise a Debian bookworm image made with debootstrap + `docker import` (the
#    tarball is cached as ~/.cache/edgellm/docker-base-<arch>.tar), with this machine's CA bundle,
#    which pip inside the build then uses. On amd64 a local CPU wheel of the pinned torch
#    (`pip download torch==<pin>+cpu`, cached in ~/.cache/edgellm/docker-wheels/) goes into
#    deploy/wheels/, which the Dockerfile prefers to PyTorch's index. On arm64 torch is
#    TORCH_VERSION from TORCH_INDEX: under emulation 2.9.1 from PyPI (a CPU build for aarch64; the
#    pinned 2.13 there is a CUDA build), on a Pi the Dockerfile's defaults (the pin, CPU index).
# 3. Compose: `up -d` on docker-compose.yml as it is (HTTP on a free loopback port), waits for
#    /health, sends the README's chat request (temperature 0, repetition penalty 1.1) and checks the
#    answer against the embedded model's sample in its README, records `docker stats` idle and while
#    serving, then streams a long greedy completion, SIGKILLs worker1's process during it (as a crash
#    or the OOM killer would; a `docker kill` is a manual stop, which no restart policy undoes), and
#    checks that the stream ends with the same text as without the kill or with a clean error, that
#    the restart policy brings worker1 back and that /health is 200 again and a new request is
#    answered; `down -v`.
#    Under emulation: a compose override gives the workers a longer healthcheck start period, and
#    there is no kill (a worker needs minutes to start under qemu).
# 4. Swarm (not under emulation): `swarm init` on this node, the labels deploy/stack.yml places
#    by, `stack deploy`, the same chat check, `stack rm`, `swarm leave --force`.
#
# Prints each step with its time; exits 0 when all passed, 1 on a failure, 77 when it cannot run
# here (not root and no usable engine, no apt-get to install one), with the reason.
# Environment: EDGELLM_CACHE_DIR (default ~/.cache/edgellm); TORCH_VERSION, TORCH_INDEX (build args);
# COMPOSE_CHECK_TIMEOUT (seconds to wait for /health, default 300, 1800 under emulation).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${EDGELLM_CACHE_DIR:-$HOME/.cache/edgellm}
HOST_ARCH=$(dpkg --print-architecture 2>/dev/null || uname -m)
ARCH=$HOST_ARCH
SWARM=1
OFFICIAL_BASE=python:3.11-slim-bookworm
# The embedded model's answer to the README's chat request as server/default_model/README.md gives
# it: transformers' generate(do_sample=False), which applies the model's generation_config.json and
# its repetition_penalty 1.1 (plain greedy answers 'Return the list of directories for the given module.').
README_CHAT='{"model": "default_model", "messages": [{"role": "user", "content": "What does the json module do?"}], "max_tokens": 40, "temperature": 0, "repetition_penalty": 1.1}'
README_ANSWER='Return a list of strings for the given argument.'

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) ARCH=${2:?--arch needs amd64 or arm64}; shift 2 ;;
        --no-swarm) SWARM=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compose-check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
case "$ARCH" in amd64|arm64) ;; *) echo "compose-check: --arch is amd64 or arm64, not '$ARCH'" >&2; exit 2 ;; esac
EMULATED=0; [ "$ARCH" = "$HOST_ARCH" ] || EMULATED=1
HEALTH_TIMEOUT=${COMPOSE_CHECK_TIMEOUT:-$([ $EMULATED = 1 ] && echo 1800 || echo 300)}
IMAGE=edgellm:check-$ARCH
PROJECT=edgellm-check-$ARCH
STACK=edgellm-check
export DOCKER_BUILDKIT=0  # the legacy builder: no BuildKit frontend image to pull from Docker Hub

START=$(date +%s)
SUMMARY=()
WORK=$(mktemp -d /tmp/compose-check.XXXXXX)
COMPOSE_UP=0 STACK_UP=0 SWARM_MINE=0
step_start=$START

now() { date +%s; }
log() { echo "[compose-check $(( $(now) - START ))s] $*"; }
step() { step_start=$(now); log "== $*"; }
done_step() { local took=$(( $(now) - step_start )); SUMMARY+=("$(printf '%5ss  %s' "$took" "$*")"); log "   done in ${took}s"; }
skip() { echo "compose-check: SKIP: $*" >&2; exit 77; }
fail() { echo "compose-check: FAIL: $*" >&2; exit 1; }

COMPOSE_FILES=(-f "$ROOT/docker-compose.yml")
if [ $EMULATED = 1 ]; then
    # Under qemu a worker takes minutes to listen (151 s measured, load ~20), past the compose file's
    # worker healthcheck (30 s start period + 3 x 10 s), and compose then never creates the coordinator.
    printf 'services:\n  worker1:\n    healthcheck:\n      start_period: 30m\n  worker2:\n    healthcheck:\n      start_period: 30m\n' \
        >"$WORK/emulated.yml"
    COMPOSE_FILES+=(-f "$WORK/emulated.yml")
fi
dc() { docker-compose --project-directory "$ROOT" "${COMPOSE_FILES[@]}" -p "$PROJECT" "$@"; }

cleanup() {
    local rc=$?
    set +e
    if [ $COMPOSE_UP = 1 ]; then
        if [ $rc -ne 0 ]; then log "logs of the failed compose run:"; dc logs --no-color --tail 40; fi
        dc down -v --remove-orphans >/dev/null 2>&1
    fi
    if [ $STACK_UP = 1 ]; then
        if [ $rc -ne 0 ]; then
            log "state of the failed stack:"; docker stack ps --no-trunc "$STACK"
            for s in coordinator worker1 worker2; do docker service logs --tail 30 "${STACK}_$s"; done
        fi
        docker stack rm "$STACK" >/dev/null 2>&1
        wait_gone
    fi
    [ $SWARM_MINE = 1 ] && docker swarm leave --force >/dev/null 2>&1
    rm -rf "$WORK"
    if [ ${#SUMMARY[@]} -gt 0 ]; then
        echo "compose-check ($ARCH$([ $EMULATED = 1 ] && echo ', emulated')): $([ $rc -eq 0 ] && echo passed || echo "FAILED ($rc)") in $(( $(now) - START ))s"
        printf '  %s\n' "${SUMMARY[@]}"
    fi
    exit $rc
}
trap cleanup EXIT

# Poll URL until it answers 200 or SECONDS pass.
wait_health() {
    local url=$1 seconds=$2 deadline=$(( $(now) + $2 )) code=
    while [ "$(now)" -lt $deadline ]; do
        code=$(curl -s -o "$WORK/health.json" -w '%{http_code}' --max-time 5 "$url" || true)
        [ "$code" = 200 ] && return 0
        sleep 2
    done
    fail "$url did not answer 200 within ${seconds}s (last: $code $(cat "$WORK/health.json" 2>/dev/null))"
}

# The README's chat request; fails unless the answer is the embedded model's greedy sample.
check_chat() {
    local url=$1 answer
    curl -sS --fail-with-body --max-time 600 "$url/v1/chat/completions" -H 'Content-Type: application/json' \
        -d "$README_CHAT" >"$WORK/chat.json" || fail "the chat request failed: $(cat "$WORK/chat.json")"
    answer=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])' \
        <"$WORK/chat.json")
    [ "$answer" = "$README_ANSWER" ] || fail "the chat answer is '$answer', expected '$README_ANSWER'"
    log "   chat answer: $answer"
}

wait_gone() {  # until no container of the stack is left (stack rm returns before they stop)
    local i
    for i in $(seq 120); do
        [ -z "$(docker ps -aq --filter "label=com.docker.stack.namespace=$STACK")" ] && return 0
        sleep 1
    done
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- 1. the engine ----------------------------------------------------------------------------------------------

# A dockerd killed with its machine (a session's end, a power cut) leaves its pid files behind. On
# the next start dockerd trusts them: when the pid now belongs to some other process it reports
# "containerd is still running", waits for a socket that never comes, and gives up. A pid file
# whose process is not that program is removed first.
remove_stale_pid_files() {
    local file program pid
    for file in /var/run/docker.pid:dockerd /var/run/docker/containerd/containerd.pid:containerd; do
        program=${file#*:}
        file=${file%%:*}
        [ -f "$file" ] || continue
        pid=$(tr -dc 0-9 <"$file")
        if [ -z "$pid" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$program" ]; then
            log "removing the stale $file (pid ${pid:-none} is not $program)"
            rm -f "$file"
        fi
    done
}

ensure_engine() {
    local rc=0
    bash "$ROOT/deploy/install-system-deps.sh" docker "$([ "$ARCH" = arm64 ] && echo arm64)" || rc=$?
    [ $rc -eq 3 ] && skip "the Docker engine, docker-compose, debootstrap or curl is missing and cannot be installed here (root and apt-get needed)"
    [ $rc -eq 0 ] || fail "deploy/install-system-deps.sh docker failed ($rc)"
    if ! docker info >/dev/null 2>&1; then
        [ "$(id -u)" -eq 0 ] || skip "no Docker engine answers this user, and starting dockerd needs root"
        if ! pgrep -x dockerd >/dev/null; then
            mkdir -p "$CACHE"
            remove_stale_pid_files
            log "starting dockerd (log: $CACHE/dockerd.log)"
            # 9>&-: the run's lock (fd 9) must not live on in the engine, or the next run waits forever
            setsid dockerd >>"$CACHE/dockerd.log" 2>&1 </dev/null 9>&- &
        fi
        local i
        for i in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        if ! docker info >/dev/null 2>&1; then
            tail -n 20 "$CACHE/dockerd.log" >&2 || true
            fail "dockerd did not start: see $CACHE/dockerd.log (its last lines above)"
        fi
    fi
    if [ "$ARCH" = arm64 ] && [ $EMULATED = 1 ]; then
        # binfmt_misc makes the kernel run aarch64 binaries through qemu, in containers too
        # (the F flag of Debian's registration opens the interpreter once, here).
        mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf >/proc/sys/fs/binfmt_misc/register
    fi
}

# --- 2. the image -----------------------------------------------------------------------------------------------

debian_mirror() {
    grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | tr -d ' ' | grep -v security | head -n 1 || true
}

# Sets BASE: the official image if it is here or can be pulled, else one made with debootstrap.
base_image() {
    if [ "$ARCH" = "$HOST_ARCH" ]; then
        if docker image inspect "$OFFICIAL_BASE" >/dev/null 2>&1 || timeout 300 docker pull -q "$OFFICIAL_BASE" >/dev/null 2>&1; then
            BASE=$OFFICIAL_BASE
            return
        fi
        log "   $OFFICIAL_BASE cannot be pulled: a Debian base image instead"
    fi
    BASE=edgellm-base:bookworm-$ARCH
    docker image inspect "$BASE" >/dev/null 2>&1 && return
    local tarball=$CACHE/docker-base-$ARCH.tar
    if [ ! -s "$tarball" ]; then
        [ "$(id -u)" -eq 0 ] || skip "making a base image with debootstrap needs root"
        local mirror tree=$CACHE/docker-base-$ARCH.tree
        mirror=$(debian_mirror); mirror=${mirror:-http://deb.debian.org/debian}
        log "   debootstrap --arch=$ARCH bookworm from $mirror (a few minutes; cached as $tarball)"
        rm -rf "$tree"
        debootstrap --arch="$ARCH" --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
            bookworm "$tree" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
            || { tail -n 20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed"; }
        # TLS through this machine's CA bundle (it may hold a proxy's CA), for pip as well
        # (pip's own certifi bundle ignores the system's).
        cp /etc/ssl/certs/ca-certificates.crt "$tree/etc/ssl/certs/ca-certificates.crt"
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$tree/etc/pip.conf"
        rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/*
        tar -C "$tree" -cf "$tarball.partial" . && mv "$tarball.partial" "$tarball"
        rm -rf "$tree"
    fi
    docker import "$tarball" "$BASE" >/dev/null
}

# On amd64, a local CPU wheel of the pinned torch into deploy/wheels/ (PyTorch's index may not be
# reachable; PyPI's wheel of the same version is a CUDA build).
torch_wheel() {
    local pin wheels=$ROOT/deploy/wheels cached=$CACHE/docker-wheels pip=python3
    pin=$(grep -oE '"torch==[^";]+' "$ROOT/pyproject.toml" | head -n 1 | cut -d= -f3)
    [ -n "${TORCH_VERSION:-}" ] && [ "$TORCH_VERSION" != "$pin" ] && return
    ls "$wheels"/torch-"$pin"+cpu-*.whl >/dev/null 2>&1 && return
    mkdir -p "$cached"
    if ! ls "$cached"/torch-"$pin"+cpu-*.whl >/dev/null 2>&1; then
        [ -x "$ROOT/.venv/bin/python" ] && pip=$ROOT/.venv/bin/python
        # "+cpu" exactly: where only PyPI answers this fails at once instead of fetching CUDA.
        "$pip" -m pip download -q --no-deps --only-binary :all: -d "$cached" "torch==$pin+cpu" >"$WORK/pip.log" 2>&1 \
            || { log "   no local CPU wheel of torch $pin ($(tail -n 1 "$WORK/pip.log")): the image takes PyTorch's index"; return; }
    fi
    ln -f "$cached"/torch-"$pin"+cpu-*.whl "$wheels"/ 2>/dev/null || cp "$cached"/torch-"$pin"+cpu-*.whl "$wheels"/
    log "   torch wheel for the image: $(cd "$wheels" && ls torch-*.whl)"
}

build_image() {
    local args=(--build-arg "PYTHON_IMAGE=$BASE")
    if [ "$ARCH" = arm64 ] && [ $EMULATED = 1 ]; then
        # PyTorch's CPU index is out of reach here, and PyPI's aarch64 torch 2.13 is a CUDA build;
        # its 2.9.1 is a CPU build. On a Pi the Dockerfile's defaults apply (the pin, CPU index).
        TORCH_VERSION=${TORCH_VERSION:-2.9.1} TORCH_INDEX=${TORCH_INDEX:-https://pypi.org/simple}
    fi
    [ "$ARCH" = amd64 ] && torch_wheel
    [ -n "${TORCH_VERSION:-}" ] && args+=(--build-arg "TORCH_VERSION=$TORCH_VERSION")
    [ -n "${TORCH_INDEX:-}" ] && args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
    log "   docker build ${args[*]} -t $IMAGE"
    docker build -q -f "$ROOT/deploy/Dockerfile" -t "$IMAGE" "${args[@]}" "$ROOT" >"$WORK/build.log" 2>&1 \
        || { tail -n 40 "$WORK/build.log" >&2; fail "docker build failed"; }
    local arch
    arch=$(docker run --rm --entrypoint uname "$IMAGE" -m)
    log "   image $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}'), runs as $arch"
    case "$ARCH:$arch" in amd64:x86_64|arm64:aarch64) ;; *) fail "the $ARCH image runs as $arch" ;; esac
}

# --- 3. compose -------------------------------------------------------------------------------------------------

stats() {  # memory of each container of the project, one line
    docker stats --no-stream --format '{{.Name}}={{.MemUsage}}' $(dc ps -q) | sed 's/ \/ .*//' | tr '\n' ' '
}

compose_check() {
    local port url
    port=$(free_port)
    url=http://127.0.0.1:$port
    export EDGELLM_IMAGE=$IMAGE EDGELLM_HTTP_PORT=127.0.0.1:$port
    unset EDGELLM_MODELS EDGELLM_MODEL EDGELLM_DTYPE EDGELLM_THREADS EDGELLM_CLUSTER_TOKEN

    step "compose: up -d ($PROJECT, HTTP on $url)"
    COMPOSE_UP=1
    dc down -v --remove-orphans >/dev/null 2>&1 || true
    dc up -d --no-build 2>&1 | sed 's/^/   /'
    wait_health "$url/health" "$HEALTH_TIMEOUT"
    done_step "compose up until /health is 200"
    if [ "$ARCH" = amd64 ]; then  # the kernels built into the image load as the runtime user, with no compiler
        docker exec "$(dc ps -q coordinator)" python -c \
            "from worker.kernels import native; assert native.f32_mm() is not None and native.int8_mm() is not None" \
            || fail "the image's native kernels do not load in the coordinator container"
        log "   native kernels load in the container (built at image build time)"
    fi
    sleep 3
    log "   memory idle: $(stats)"

    step "compose: the README's chat request"
    check_chat "$url"
    done_step "compose: README chat request answered and checked"

    # the same long greedy completion, first undisturbed (the reference), then with a kill
    local tokens=400
    [ $EMULATED = 1 ] && tokens=40
    local req='{"model": "default_model", "prompt": "The ", "max_tokens": '$tokens', "ignore_eos": true, "temperature": 0'
    step "compose: a $tokens-token completion, undisturbed (memory while serving)"
    curl -sS --fail-with-body --max-time 900 "$url/v1/completions" -H 'Content-Type: application/json' \
        -d "$req}" >"$WORK/reference.json" &
    local ref=$!
    sleep 1
    log "   memory serving: $(stats)"
    wait $ref || fail "the reference completion failed: $(cat "$WORK/reference.json")"
    done_step "compose: $tokens-token completion"

    if [ $EMULATED = 1 ]; then
        log "   under emulation: no kill (a worker takes minutes to start again under qemu)"
    else
        kill_worker "$url" "$req"
    fi

    step "compose: down -v"
    dc down -v --remove-orphans 2>&1 | sed 's/^/   /'
    COMPOSE_UP=0
    done_step "compose down -v"
}

# A long greedy stream, worker1 killed during it: the stream must end with the reference's text or a
# clean error, the restart policy must bring worker1 back, and the cluster must answer again.
kill_worker() {
    local url=$1 req=$2 worker old new

    step "compose: worker1 killed while a stream runs"
    worker=$(dc ps -q worker1)
    old=$(docker inspect -f '{{.State.StartedAt}}' "$worker")
    curl -sS -N --max-time 900 "$url/v1/completions" -H 'Content-Type: application/json' \
        -d "$req, \"stream\": true}" >"$WORK/stream.txt" &
    local stream=$!
    local i
    for i in $(seq 600); do grep -q '^data: {' "$WORK/stream.txt" && break; sleep 0.1; done
    grep -q '^data: {' "$WORK/stream.txt" || fail "the stream sent nothing in 60 s"
    # SIGKILL to the container's process from outside, as the kernel's OOM killer or a crash ends
    # it. Not `docker kill`: Docker counts that as a manual stop, which no restart policy undoes
    # (`restart: unless-stopped` or `always` leave such a container stopped until it is started).
    kill -KILL "$(docker inspect -f '{{.State.Pid}}' "$worker")"
    log "   killed worker1's process (SIGKILL) after $(grep -c '^data: {' "$WORK/stream.txt") chunks"
    wait $stream || true
    python3 - "$WORK/stream.txt" "$WORK/reference.json" <<'EOF' || fail "the stream did not end cleanly: $(tail -n 3 "$WORK/stream.txt")"
import json, sys
lines = [l[6:] for l in open(sys.argv[1]).read().splitlines() if l.startswith("data: ")]
reference = json.load(open(sys.argv[2]))["choices"][0]["text"]
assert lines and lines[-1] == "[DONE]", f"no [DONE] at the end: {lines[-3:]}"
chunks = [json.loads(l) for l in lines[:-1]]
errors = [c["error"] for c in chunks if "error" in c]
if errors:
    print(f"   the stream ended with a clean error: {errors[-1]}")
else:
    text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
    assert finish == ["length"], finish
    assert text == reference, f"the stream's text differs from the undisturbed run's:\n{text!r}\n{reference!r}"
    print(f"   the stream completed: {len(chunks)} chunks, the same {len(reference)} characters as undisturbed")
EOF
    for i in $(seq 120); do
        new=$(docker inspect -f '{{.State.StartedAt}}' "$worker")
        [ "$new" != "$old" ] && [ "$(docker inspect -f '{{.State.Running}}' "$worker")" = true ] && break
        sleep 1
    done
    [ "$new" != "$old" ] || fail "worker1 was not restarted by its restart policy ($(docker inspect -f '{{.State.Status}} restarts={{.RestartCount}}' "$worker"))"
    log "   worker1 restarted (restart count $(docker inspect -f '{{.RestartCount}}' "$worker"))"
    wait_health "$url/health" "$HEALTH_TIMEOUT"
    check_chat "$url"
    done_step "compose: worker1 killed mid-stream, back, /health 200, answering"
}

# --- 4. swarm ---------------------------------------------------------------------------------------------------

swarm_check() {
    local port url node models state
    state=$(docker info -f '{{.Swarm.LocalNodeState}}')
    step "swarm: init, labels, stack deploy"
    if [ "$state" = inactive ]; then
        docker swarm init --advertise-addr 127.0.0.1 >/dev/null
        SWARM_MINE=1
    else
        log "   this node is already in a swarm ($state): using it, and leaving it afterwards is up to you"
    fi
    node=$(docker info -f '{{.Swarm.NodeID}}')
    # one node: every rank's label on it
    docker node update --label-add edgellm.coordinator=true --label-add edgellm.worker1=true \
        --label-add edgellm.worker2=true "$node" >/dev/null
    models=$WORK/models
    mkdir -p "$models" && cp -r "$ROOT/server/default_model" "$models/" && chmod -R a+rX "$WORK"
    port=$(free_port)
    url=http://127.0.0.1:$port
    STACK_UP=1
    EDGELLM_IMAGE=$IMAGE EDGELLM_MODELS=$models EDGELLM_HTTP_PORT=$port \
        EDGELLM_CLUSTER_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))') \
        docker stack deploy --resolve-image never -c "$ROOT/deploy/stack.yml" "$STACK" 2>&1 | sed 's/^/   /'
    wait_health "$url/health" "$HEALTH_TIMEOUT"
    done_step "swarm: init + stack deploy until /health is 200"

    step "swarm: the README's chat request"
    check_chat "$url"
    done_step "swarm: README chat request answered and checked"

    step "swarm: stack rm, swarm leave"
    docker stack rm "$STACK" 2>&1 | sed 's/^/   /'
    wait_gone
    STACK_UP=0
    docker node update --label-rm edgellm.coordinator --label-rm edgellm.worker1 --label-rm edgellm.worker2 "$node" >/dev/null
    if [ $SWARM_MINE = 1 ]; then docker swarm leave --force >/dev/null; SWARM_MINE=0; fi
    done_step "swarm: stack rm + swarm leave"
}

main() {
    # One run at a time on a machine: two would share the compose project, the stack and the swarm.
    mkdir -p "$CACHE"
    exec 9>"$CACHE/compose-check.lock"
    flock -n 9 || { log "waiting for another compose-check run to finish";
                    flock -w 1800 9 || fail "$CACHE/compose-check.lock still held after 30 minutes, by: $(fuser "$CACHE/compose-check.lock" 2>&1)"; }
    step "engine: install-system-deps, dockerd"
    ensure_engine
    done_step "engine ready ($(docker version -f '{{.Server.Version}}'), docker-compose $(docker-compose version --short))"
    step "image: base, docker build ($ARCH$([ $EMULATED = 1 ] && echo ', emulated'))"
    base_image
    log "   base image: $BASE"
    build_image
    done_step "image $IMAGE built"
    compose_check
    if [ $SWARM = 1 ]; then
        if [ $EMULATED = 1 ]; then log "swarm: skipped under emulation (compose already ran the $ARCH image)"; else swarm_check; fi
    fi
    log "all checks passed"
}

# whole file parsed before anything runs (an edit of the script during a run does not derail it)
main; exit
