#!/bin/bash
# The whole test suite, as root on Debian 12: installs what the tests need, then runs every test:
# the fast ones, the VM ones (real kernel with dm-crypt, booted once) and the real-Slurm ones.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not vm" -x). Strict mode: a test that does not
# run (skipped, xfailed) fails with its reason, so a green run means every selected test ran and passed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${SPANK_SIF_PREFIX:-/opt/spank-sif}
bash "$here/scripts/install.sh" --test
cd "$here"
export PATH="$prefix/bin:$PATH"
export SPANK_SIF_STRICT=1
exec "$prefix/bin/python3" -m pytest "$@"
