#!/usr/bin/env bash
# An emulated multi-host cluster on one Linux machine: the coordinator and each worker get their
# own network namespace, with their own interface and address, joined by veth pairs to a bridge
# that lives in a namespace of its own. Every link is capped in both directions with a token
# bucket (tc tbf), so the data plane runs over real interfaces at Ethernet-like or Wi-Fi-like
# rates. The root namespace is never touched: no route, no address, no bridge there.
#
#   deploy/netns-cluster.sh up N [--rate 100mbit] [--burst BYTES]
#                                                   coordinator + N workers (replaces any previous one)
#   deploy/netns-cluster.sh down                    kill what runs inside, delete the namespaces
#   deploy/netns-cluster.sh exec NAME CMD...        run CMD in NAME's namespace (coordinator, worker1, ...)
#   deploy/netns-cluster.sh addr NAME               print NAME's address
#   deploy/netns-cluster.sh status                  namespaces, addresses and qdiscs
#
# Addresses (private, only inside these namespaces): coordinator 10.77.0.1, worker K 10.77.0.(1+K),
# all in 10.77.0.0/24. Namespace names start with $EDGELLM_NETNS_PREFIX (default: edgellm), so two
# emulated clusters (say two test runs) can coexist: each has its own bridge.
#
# Example, 2 workers on 20 Mbit/s links (run as root; edgellm installed in .venv):
#   deploy/netns-cluster.sh up 2 --rate 20mbit
#   deploy/netns-cluster.sh exec worker1 .venv/bin/edgellm worker --host 10.77.0.2 --cluster-token t &
#   deploy/netns-cluster.sh exec worker2 .venv/bin/edgellm worker --host 10.77.0.3 --cluster-token t &
#   deploy/netns-cluster.sh exec coordinator .venv/bin/edgellm serve --cluster-token t \
#     --workers 10.77.0.2:50051,10.77.0.3:50051 --host 10.77.0.1 --hub-host 10.77.0.1 &
#   deploy/netns-cluster.sh exec coordinator curl -s http://10.77.0.1:8000/health
#   deploy/netns-cluster.sh down
set -euo pipefail

PREFIX="${EDGELLM_NETNS_PREFIX:-edgellm}"
SUBNET="10.77.0"
BRIDGE_NS="$PREFIX-br"
MAX_WORKERS=200
[[ "$PREFIX" =~ ^[A-Za-z0-9_-]{1,40}$ ]] || { echo "netns-cluster: EDGELLM_NETNS_PREFIX must be letters, digits, - or _" >&2; exit 2; }

die() { echo "netns-cluster: $*" >&2; exit 1; }
say() { echo "netns-cluster: $*"; }

usage() {
    cat >&2 <<EOF
usage: $0 up N [--rate 100mbit] [--burst BYTES]   coordinator + N workers (replaces any previous one)
       $0 down                    kill what runs inside, delete the namespaces
       $0 exec NAME CMD...        run CMD in NAME's namespace (coordinator, worker1, ...)
       $0 addr NAME               print NAME's address
       $0 status                  namespaces, addresses and qdiscs
EOF
    exit 2
}

need_root() {
    [ "$(id -u)" -eq 0 ] || die "needs root (ip netns, tc); run it with sudo"
    command -v ip >/dev/null && command -v tc >/dev/null || die "needs ip and tc (Debian: apt-get install iproute2)"
}

# Our namespaces, exactly: $PREFIX-br, $PREFIX-coordinator, $PREFIX-worker<K>.
our_namespaces() {
    ip netns list | awk '{print $1}' | grep -E "^${PREFIX}-(br|coordinator|worker[0-9]+)\$" || true
}

node_ns() { echo "$PREFIX-$1"; }

node_addr() {
    if [ "$1" = coordinator ]; then
        echo "$SUBNET.1"
    elif [[ "$1" =~ ^worker([1-9][0-9]*)$ ]] && [ "${BASH_REMATCH[1]}" -le "$MAX_WORKERS" ]; then
        echo "$SUBNET.$((1 + BASH_REMATCH[1]))"
    else
        die "unknown node '$1' (coordinator, worker1, worker2, ...)"
    fi
}

# A rate tc understands, e.g. 100mbit, 1.5mbit, 800kbit, 1gbit. Prints bits per second.
rate_bits() {
    local rate="$1" number unit
    [[ "$rate" =~ ^([0-9]+)(kbit|mbit|gbit|bit)$ ]] || die "rate '$rate' must look like 100mbit, 800kbit or 1gbit"
    number="${BASH_REMATCH[1]}"
    unit="${BASH_REMATCH[2]}"
    case "$unit" in
        bit) echo "$number" ;;
        kbit) echo $((number * 1000)) ;;
        mbit) echo $((number * 1000000)) ;;
        gbit) echo $((number * 1000000000)) ;;
    esac
}

# Cap one interface's egress: a token bucket holding 10 ms of traffic (at least 32 KiB, so
# segmentation-offloaded packets pass whole), and at most 100 ms of queue before drops. A bucket
# that large lets a 2 KB frame through at once (a decode step never empties it); --burst BYTES
# (e.g. 4096) makes frames leave at the link's rate as on a wire (tbf then segments offloaded
# packets itself): what bench/netns_comm.py uses to check payload / bandwidth.
cap() {
    local ns="$1" dev="$2" rate="$3" burst="$4" bits
    if [ -z "$burst" ]; then
        bits="$(rate_bits "$rate")"
        burst=$((bits / 8 / 100))
        [ "$burst" -ge 32768 ] || burst=32768
    fi
    ip netns exec "$ns" tc qdisc replace dev "$dev" root tbf rate "$rate" burst "$burst" latency 100ms
}

cmd_down() {
    need_root
    local namespaces ns pids deadline
    namespaces="$(our_namespaces)"
    [ -n "$namespaces" ] || { say "nothing to remove (prefix $PREFIX)"; return 0; }
    # Processes still running inside would keep the namespaces alive after `ip netns delete`.
    for ns in $namespaces; do
        pids="$(ip netns pids "$ns" || true)"
        [ -z "$pids" ] || { say "stopping processes in $ns: $(echo $pids)"; kill -TERM $pids 2>/dev/null || true; }
    done
    deadline=$((SECONDS + 10))
    for ns in $namespaces; do
        while [ -n "$(ip netns pids "$ns" 2>/dev/null || true)" ] && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.2
        done
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    done
    for ns in $namespaces; do
        ip netns delete "$ns"
    done
    say "removed $(echo $namespaces)"
}

cmd_up() {
    [ $# -ge 1 ] || usage
    local workers="$1" rate="100mbit" burst=""
    shift
    while [ $# -gt 0 ]; do
        case "$1" in
            --rate) [ $# -ge 2 ] || usage; rate="$2"; shift 2 ;;
            --rate=*) rate="${1#--rate=}"; shift ;;
            --burst) [ $# -ge 2 ] || usage; burst="$2"; shift 2 ;;
            --burst=*) burst="${1#--burst=}"; shift ;;
            *) usage ;;
        esac
    done
    [[ "$workers" =~ ^[0-9]+$ ]] && [ "$workers" -ge 1 ] && [ "$workers" -le "$MAX_WORKERS" ] \
        || die "N must be a number of workers from 1 to $MAX_WORKERS"
    rate_bits "$rate" >/dev/null
    [ -z "$burst" ] || { [[ "$burst" =~ ^[0-9]+$ ]] && [ "$burst" -ge 1600 ]; } \
        || die "--burst is a number of bytes, at least 1600 (one full frame)"
    need_root
    cmd_down >/dev/null  # idempotent: `up` always starts from nothing
    UP_DONE=0
    trap '[ "$UP_DONE" = 1 ] || { echo "netns-cluster: up failed; cleaning up" >&2; cmd_down >&2; }' EXIT

    ip netns add "$BRIDGE_NS"
    ip -n "$BRIDGE_NS" link add br0 type bridge
    ip -n "$BRIDGE_NS" link set br0 up
    local nodes=(coordinator) k i=0 node ns addr
    for ((k = 1; k <= workers; k++)); do nodes+=("worker$k"); done
    for node in "${nodes[@]}"; do
        ns="$(node_ns "$node")"
        addr="$(node_addr "$node")"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # veth<i> stays on the bridge; its peer becomes eth0 inside the node's namespace.
        ip -n "$BRIDGE_NS" link add "veth$i" type veth peer name eth0 netns "$ns"
        ip -n "$BRIDGE_NS" link set "veth$i" master br0 up
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
        cap "$ns" eth0 "$rate" "$burst"              # node -> bridge
        cap "$BRIDGE_NS" "veth$i" "$rate" "$burst"   # bridge -> node
        say "$node: namespace $ns, address $addr, link capped at $rate each way${burst:+ (burst $burst bytes)}"
        i=$((i + 1))
    done
    UP_DONE=1
}

cmd_exec() {
    [ $# -ge 2 ] || usage
    local node="$1" ns
    shift
    node_addr "$node" >/dev/null
    need_root
    ns="$(node_ns "$node")"
    ip netns list | awk '{print $1}' | grep -qx "$ns" || die "no namespace $ns: run '$0 up N' first"
    exec ip netns exec "$ns" "$@"
}

cmd_status() {
    need_root
    local ns
    for ns in $(our_namespaces); do
        echo "== $ns"
        ip -n "$ns" -brief addr show | grep -v '^lo ' || true
        ip netns exec "$ns" tc qdisc show | grep tbf || true
    done
}

[ $# -ge 1 ] || usage
command="$1"
shift
case "$command" in
    up) cmd_up "$@" ;;
    down) cmd_down ;;
    exec) cmd_exec "$@" ;;
    addr) [ $# -eq 1 ] || usage; node_addr "$1" ;;
    status) cmd_status ;;
    *) usage ;;
esac
