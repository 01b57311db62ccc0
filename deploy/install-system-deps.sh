#!/usr/bin/env bash
# Install the Debian packages the deployment tests need, if they are missing:
#   docker-compose  `docker-compose config` validates docker-compose.yml and deploy/stack.yml
#                   (no docker engine needed)
#   iproute2        `ip netns` and `tc`, for deploy/netns-cluster.sh and tests/test_netns.py
#
# Runs apt-get only as root and only when something is missing; otherwise it says what it
# would install and exits 0, so `make setup` still works on a laptop without sudo.
set -euo pipefail

# --- aarch64 kernel tests (tests/test_arm_kernels.py) -----------------------------------------
# gcc-aarch64-linux-gnu  aarch64-linux-gnu-gcc: cross-compiles worker/kernels/arm/ and its harness
# qemu-user-static       qemu-aarch64-static: runs the harness as a Cortex-A72 (no dot product,
#                        the Pi 4) and a Cortex-A76 (dot product, the Pi 5)
# The tests call qemu-aarch64-static directly, so binfmt_misc is not needed for them; it is
# mounted here (as root, once per boot) for whoever runs aarch64 binaries or chroots directly.
arm_missing=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || arm_missing+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null 2>&1 || arm_missing+=(qemu-user-static)
if [ ${#arm_missing[@]} -gt 0 ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: apt-get install ${arm_missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${arm_missing[@]}"
elif [ ${#arm_missing[@]} -gt 0 ]; then
    echo "install-system-deps: missing ${arm_missing[*]} (tests/test_arm_kernels.py skips); as root: $0" >&2
fi
if [ "$(id -u)" -eq 0 ] && [ -d /proc/sys/fs/binfmt_misc ] && [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || echo "install-system-deps: could not mount binfmt_misc" >&2
fi
# --- end of the aarch64 kernel tests' block ---------------------------------------------------

missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
{ command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; } || missing+=(iproute2)

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-system-deps: docker-compose, ip and tc are present"
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
