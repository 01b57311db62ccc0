#!/usr/bin/env bash
# Install the Debian packages the deployment tests need, if they are missing:
#   docker-compose  `docker-compose config` validates docker-compose.yml and deploy/stack.yml
#                   (no docker engine needed)
#   iproute2        `ip netns` and `tc`, for deploy/netns-cluster.sh and tests/test_netns.py
#
# Runs apt-get only as root and only when something is missing; otherwise it says what it
# would install and exits 0, so `make setup` still works on a laptop without sudo.
set -euo pipefail

missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
{ command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; } || missing+=(iproute2)

# --- tpstep: the data-plane lanes (worker/lane.py, worker/kernels/lane.c) compile against
# libsodium (ChaCha20-Poly1305 on every frame); without it allreduces fall back to ZeroMQ.
[ -f /usr/include/sodium.h ] || missing+=(libsodium-dev)
# --- end tpstep

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-system-deps: docker-compose, ip, tc and libsodium-dev are present"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: missing ${missing[*]}; no apt-get here, install them with your package manager" >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: missing ${missing[*]}; run: sudo $0" >&2
    echo "install-system-deps: (tests/test_deploy.py fails and tests/test_netns.py skips until then)" >&2
    exit 0
fi
echo "install-system-deps: apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
