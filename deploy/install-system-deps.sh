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

missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
{ command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; } || missing+=(iproute2)

# --- aarch64 under emulation and its cycle estimates ---
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
command -v qemu-aarch64-static >/dev/null 2>&1 || missing+=(qemu-user-static)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || missing+=(g++-aarch64-linux-gnu)
[ -x /usr/lib/llvm-19/bin/llvm-mca ] || missing+=(llvm-19)
# --- end aarch64 ---

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-system-deps: docker-compose, ip, tc and the aarch64 tools are present"
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
