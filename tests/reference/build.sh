#!/bin/bash
# Builds the reference SIF tools of this directory, siftool and sifref, into OUTDIR, offline: go.mod
# points every module at Debian's copy under /usr/share/gocode/src, and the module proxy is off.
# Needs golang-go and golang-github-sylabs-sif-dev (bash scripts/install.sh --test installs both).
# usage: build.sh OUTDIR
set -euo pipefail
out=$(realpath -m "${1:?usage: build.sh OUTDIR}")
here=$(cd "$(dirname "$0")" && pwd)
if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/github.com/sylabs/sif ]; then
  echo "build.sh: needs Debian's golang-go and golang-github-sylabs-sif-dev:" \
       "run 'bash scripts/install.sh --test'" >&2
  exit 1
fi
# An empty module cache of our own: whatever another build left in the machine's cannot stand in
# for a module that go.mod fails to point at Debian's copy.
modcache=$(mktemp -d)
trap 'chmod -R u+w "$modcache"; rm -rf "$modcache"' EXIT
export GOWORK=off GOFLAGS=-mod=readonly GOPROXY=off GOSUMDB=off GOMODCACHE=$modcache
mkdir -p "$out"
cd "$here"
for tool in siftool sifref; do
  go build -trimpath -o "$out/$tool" "./$tool"
done
