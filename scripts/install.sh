#!/bin/bash
# Installs spank-sif and everything its demo and tests need on a Debian 12 machine, as root.
#   scripts/install.sh            system packages + /opt/spank-sif (the plugin's Python environment)
#   scripts/install.sh --vm       ... plus the VM harness (qemu, Debian's kernel, virtme-ng), which
#                                 runs jobs needing dm-crypt on machines whose kernel lacks it (demo)
#   scripts/install.sh --test     ... plus the VM harness and the test tools (pytest, hypothesis, ...)
# The plugin runs as every job's user, so its Python must be world-readable: it is a venv made from
# Debian's /usr/bin/python3 (which has a shared libpython), never a Python under /root.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${SPANK_SIF_PREFIX:-/opt/spank-sif}
with_tests=0 with_vm=0
case "${1:-}" in
  --test) with_tests=1 with_vm=1 ;;
  --vm) with_vm=1 ;;
  "") ;;
  *) echo "usage: $0 [--vm|--test]" >&2; exit 64 ;;
esac

packages=(
  python3 python3-venv python3-dev libpython3.11 gcc libc6-dev   # plugin build and runtime
  cryptsetup-bin libcryptsetup12 squashfs-tools kmod util-linux    # image handling on nodes
  dmsetup                                                        # tests ask the system about mappings
  binutils procps passwd                                         # readelf, pgrep, useradd (tests, admin)
  slurmd slurmctld slurm-client munge libslurm-dev               # Slurm 22.05 (plugin headers, tests)
)
if [ $with_vm = 1 ]; then
  packages+=(qemu-system-x86 linux-image-amd64 busybox-static iproute2)  # the VM harness (dm-crypt kernel)
fi
if [ $with_tests = 1 ]; then
  packages+=(
    golang-go golang-github-sylabs-sif-dev                        # the reference SIF implementation
    git                                                           # the bare-clone test
    openssh-client openssl                                        # foreign key formats in key tests
  )
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# pip, minus the warnings some machines' pip.conf causes for local index folders that do not exist
pip() { "$prefix/bin/pip" -q "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }
[ -x "$prefix/bin/python3" ] || /usr/bin/python3 -m venv "$prefix"
pip install --upgrade pip
if [ $with_tests = 1 ]; then
  pip install "$here[test]" virtme-ng
elif [ $with_vm = 1 ]; then
  pip install "$here" virtme-ng
else
  pip install "$here"
fi
chmod -R a+rX "$prefix"
echo "spank-sif installed in $prefix"
