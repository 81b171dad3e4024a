#!/bin/bash
# The demo, as root on Debian 12: installs spank-sif, builds two small encrypted images (passphrase
# and PEM mode) with the real cryptsetup, shows what spank-sif sees in them (`inspect`, `verify-key`
# with the right and a wrong key), then runs the product's real job: a single-node Slurm with the
# plugin, and `srun --sif-image=...` as an ordinary user, printing the image's file and showing that
# nothing is left on the node. Where this machine's kernel has no device-mapper, the job runs in a
# VM with Debian's kernel (installed here for that; it says so and how long it takes).
#   bash scripts/demo.sh [DIR]          (default DIR: /tmp/spank-sif-demo)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${SPANK_SIF_PREFIX:-/opt/spank-sif}
dir=${1:-/tmp/spank-sif-demo}
export SPANK_SIF_PREFIX=$prefix
bash "$here/scripts/install.sh" --vm
"$prefix/bin/spank-sif" demo "$dir" --fast-kdf
echo
echo "=== 6. the real job: srun --sif-image on a Slurm node"
exec "$prefix/bin/python3" "$here/scripts/demo_job.py" "$dir"
