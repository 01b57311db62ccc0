#!/usr/bin/env bash
# Install the Debian packages the deployment tests need, if they are missing:
#   docker-compose  `docker-compose config` validates docker-compose.yml and deploy/stack.yml
#                   (no docker engine needed)
#   iproute2        `ip netns` and `tc`, for deploy/netns-cluster.sh and tests/test_netns.py
# and, for checking the aarch64 (Raspberry Pi) code on this machine:
#   debootstrap            an arm64 Debian tree (deploy/arm64-root.sh, tests/test_arm64.py)
#   qemu-user-static       runs that tree's aarch64 binaries through binfmt_misc
#   gcc-aarch64-linux-gnu  the cross compiler (bench/arm_cycles.py, the NEON kernel tests)
#   g++-aarch64-linux-gnu  and for C++ (bench/arm_cycles.py builds distributed-llama's loop)
#   llvm-19                llvm-mca with Cortex-A72 and Neoverse-N1 (Pi 5 class) models
#
# Runs apt-get only as root and only when something is missing; otherwise it says what it
# would install and exits 0, so `make setup` still works on a laptop without sudo.
set -euo pipefail

# ==== docker block (deploy/compose-check.sh; owner: the container cluster check) =================
# `install-system-deps.sh docker [arm64]` installs what deploy/compose-check.sh needs to build and run
# the images itself: the Docker engine (docker.io), docker-compose, debootstrap (a Debian base image
# when Docker Hub is unreachable), curl (the checks' HTTP client), and with arm64 qemu-user-static
# (aarch64 binaries run under emulation once binfmt_misc is mounted). Not part of `make setup`:
# hundreds of MB that only this check uses. Exits 3 when they are missing and cannot be installed
# here (not root, or no apt-get), so that the caller can say why it skips.
if [ "${1:-}" = docker ]; then
    want=()
    command -v dockerd >/dev/null 2>&1 || want+=(docker.io)
    command -v docker-compose >/dev/null 2>&1 || want+=(docker-compose)
    command -v debootstrap >/dev/null 2>&1 || want+=(debootstrap)
    command -v curl >/dev/null 2>&1 || want+=(curl)
    if [ "${2:-}" = arm64 ]; then
        [ -e /usr/bin/qemu-aarch64-static ] || want+=(qemu-user-static)
    fi
    if [ ${#want[@]} -eq 0 ]; then
        echo "install-system-deps: the docker check's packages are present"
        exit 0
    fi
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "install-system-deps: missing ${want[*]}; install them as root with apt-get (sudo $0 docker${2:+ $2})" >&2
        exit 3
    fi
    echo "install-system-deps: apt-get install ${want[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${want[@]}"
    exit 0
fi
# ==== end of the docker block ======================================================================

# --- binfmt_misc, for aarch64 binaries and chroots run directly (tests/test_arm64.py, the arm64
# images): mounted as root, once per boot. The aarch64 packages are in the list below.
if [ "$(id -u)" -eq 0 ] && [ -d /proc/sys/fs/binfmt_misc ] && [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || echo "install-system-deps: could not mount binfmt_misc" >&2
fi
# --- end of binfmt_misc

missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
{ command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; } || missing+=(iproute2)

# --- aarch64 under emulation (tests/test_arm_kernels.py: the cross compiler and qemu-aarch64-static,
# as a Cortex-A72 and a Cortex-A76; tests/test_arm64.py: debootstrap) and its cycle estimates (llvm-19)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
command -v qemu-aarch64-static >/dev/null 2>&1 || missing+=(qemu-user-static)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || missing+=(g++-aarch64-linux-gnu)
[ -x /usr/lib/llvm-19/bin/llvm-mca ] || missing+=(llvm-19)
# --- end aarch64 ---

# --- the data-plane lanes (worker/comm/lane.py, worker/kernels/lane.c) compile against
# libsodium (ChaCha20-Poly1305 on every frame); without it allreduces fall back to ZeroMQ.
[ -f /usr/include/sodium.h ] || missing+=(libsodium-dev)
# --- end lanes

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-system-deps: docker-compose, ip, tc, the aarch64 tools and libsodium-dev are present"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: missing ${missing[*]}; no apt-get here, install them with your package manager" >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: missing ${missing[*]}; run: sudo $0" >&2
    echo "install-system-deps: (tests/test_deploy.py fails and tests/test_netns.py, tests/test_arm64.py skip until then)" >&2
    exit 0
fi
echo "install-system-deps: apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
