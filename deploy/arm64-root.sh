#!/usr/bin/env bash
# An arm64 Debian tree with edgellm's Python dependencies, to run the project on aarch64 under
# qemu on an x86 machine (tests/test_arm64.py runs the kernel tests and a 2-rank cluster in it).
#
#   sudo deploy/arm64-root.sh         # builds the tree once, then prints its path
#
# As root it: installs debootstrap and qemu-user-static (deploy/install-system-deps.sh), mounts
# binfmt_misc and registers qemu-aarch64 there (so the tree's binaries run under chroot),
# debootstraps bookworm arm64 (minbase + python3, python3-venv, gcc: the native kernels compile
# at run time; libsodium-dev: so do the data-plane lanes, worker/comm/lane.py) from the Debian mirror of this machine's apt sources, and makes /opt/venv in it
# with PyPI's torch==2.9.1, the other dependencies of pyproject.toml, and what the tests import.
# torch 2.9.1 because PyPI's aarch64 wheel of the x86 pin (2.13) is a CUDA build that does not
# import without CUDA's libraries; 2.9.1's is a CPU build.
#
# Cached in $EDGELLM_ARM64_ROOT (default ~/.cache/edgellm/arm64-bookworm): the tree records a key
# of the package lists it was built from, and a run whose key matches only checks binfmt and
# prints the path. A first build takes ~10 minutes (pip under emulation), later runs a second.
# The project itself is not installed here: the test copies the working tree in each time.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
root=${EDGELLM_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/edgellm/arm64-bookworm}
suite=bookworm
torch_pin="torch==2.9.1"
# Debian packages of the tree (debootstrap --include)
packages=python3,python3-venv,gcc,libc6-dev,libsodium-dev
# What tests/ imports beyond the runtime dependencies (pyproject's dev extra, less the linters).
test_deps=(pytest pytest-timeout httpx "transformers>=4.50" "setuptools>=77")

log() { echo "arm64-root: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "needs root (debootstrap, chroot, binfmt_misc): run sudo $0"
    exit 2
fi

bash "$here/install-system-deps.sh" >&2

# binfmt_misc: once per boot, so that aarch64 ELF files run through qemu-aarch64-static (with
# flag F the interpreter is opened now, so it also works inside the chroot).
binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/register" ]; then
    mount -t binfmt_misc binfmt_misc "$binfmt"
fi
if [ ! -e "$binfmt/qemu-aarch64" ]; then
    # The registration line Debian's qemu-user-static ships for systemd-binfmt.
    # Another process may register it between the test and the write: that is fine.
    grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf > "$binfmt/register" 2>/dev/null || true
    [ -e "$binfmt/qemu-aarch64" ] || { log "could not register qemu-aarch64 in $binfmt"; exit 1; }
fi

# The runtime dependencies of pyproject.toml, with the aarch64 torch pin in place of the x86 one.
mapfile -t deps < <(python3 - "$repo/pyproject.toml" "$torch_pin" <<'EOF'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
for d in deps:
    print(sys.argv[2] if d.replace(" ", "").startswith("torch=") or d == "torch" else d)
EOF
)
key=$(printf '%s\n' "v2" "$suite" "$packages" "${deps[@]}" "${test_deps[@]}" | sha256sum | cut -c1-16)

if [ -f "$root/.edgellm-arm64-key" ] && [ "$(cat "$root/.edgellm-arm64-key")" = "$key" ]; then
    echo "$root"
    exit 0
fi

# The Debian mirror this machine's apt uses (a deb822 or a one-line source), else the default.
mirror=$(
    { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}';
      grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'; } \
    | grep -E '/debian/?$' | head -n1
) || true
mirror=${mirror:-http://deb.debian.org/debian}

build="$root.build"
mounted=()
cleanup() {
    local m
    for m in "${mounted[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT

# A build that stopped after debootstrap (pip failed: network) starts again from there.
if grep -q " $build/" /proc/mounts 2>/dev/null; then log "$build has mounts inside; unmount them first"; exit 1; fi
if [ ! -f "$build/.debootstrapped" ] || [ "$(cat "$build/.debootstrapped")" != "$suite $mirror $packages" ]; then
    # never delete a tree with something mounted inside it (checked above: a bound /dev would go with it)
    rm -rf "$build"
    mkdir -p "$(dirname "$root")"
    log "debootstrap $suite arm64 from $mirror into $build (several minutes: its second stage runs under qemu)"
    start=$SECONDS
    debootstrap --arch=arm64 --variant=minbase --include="$packages" \
        "$suite" "$build" "$mirror" >&2
    echo "$suite $mirror $packages" > "$build/.debootstrapped"
    log "debootstrap took $((SECONDS - start)) s"
fi

for d in proc sys dev; do
    mount --bind "/$d" "$build/$d"
    mounted=("$build/$d" "${mounted[@]}")
done
cp -L /etc/resolv.conf "$build/etc/resolv.conf"
# pip inside trusts what pip here trusts: this machine's CA bundle (it may hold a proxy's CA that
# the tree's own ca-certificates lacks)
host_ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}

start=$SECONDS
log "venv /opt/venv: ${deps[*]} ${test_deps[*]} (pip under emulation: several minutes)"
# A clean environment inside: this machine's PIP_* settings (a certificate file, find-links) name
# paths that do not exist in the tree. Proxies, if any, go through.
inside=(/usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/bin)
if [ -f "$host_ca" ]; then
    cp -L "$host_ca" "$build/etc/ssl/edgellm-host-ca.crt"
    inside+=(PIP_CERT=/etc/ssl/edgellm-host-ca.crt)
fi
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [ -n "${!v:-}" ] && inside+=("$v=${!v}")
done
chroot "$build" "${inside[@]}" /usr/bin/python3 -m venv /opt/venv
chroot "$build" "${inside[@]}" /opt/venv/bin/pip install --quiet --no-cache-dir "${deps[@]}" "${test_deps[@]}" >&2
chroot "$build" "${inside[@]}" /opt/venv/bin/python -c \
    'import torch; print("arm64-root: torch", torch.__version__, torch.backends.cpu.get_cpu_capability())' >&2
log "venv took $((SECONDS - start)) s"

cleanup
mounted=()
if grep -q " $build/" /proc/mounts; then log "could not unmount everything under $build"; exit 1; fi
echo "$key" > "$build/.edgellm-arm64-key"
if [ -e "$root" ]; then
    if grep -q " $root/" /proc/mounts; then log "$root has mounts inside; unmount them first"; exit 1; fi
    rm -rf "$root"
fi
mv "$build" "$root"
echo "$root"
