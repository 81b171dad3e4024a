#!/bin/bash
# Installs spank-sif, then builds a small encrypted demo image (passphrase and PEM modes) with the real
# cryptsetup and shows what spank-sif sees in it: `inspect`, then `verify-key` with the right and a
# wrong key. Runs as root on Debian 12; no Slurm, no device-mapper needed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${SPANK_SIF_PREFIX:-/opt/spank-sif}
bash "$here/scripts/install.sh"
exec "$prefix/bin/spank-sif" demo "${1:-/tmp/spank-sif-demo}"
