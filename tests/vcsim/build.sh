#!/usr/bin/env bash
# Build hfvcsim (govmomi's vSphere simulator with the export half, hfvcsim.go) offline: Debian's Go
# in GOPATH mode against Debian's golang-github-vmware-govmomi-dev. Used by the Rust tests
# (tests/src/vcsim.rs) and ansible/farm-test.sh.
#
#   tests/vcsim/build.sh OUTPUT [WORKDIR]     # WORKDIR keeps the GOPATH and build cache
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$1
work=${2:-$(dirname "$out")}
mkdir -p "$work/gopath"
GOPATH="$work/gopath:/usr/share/gocode" GO111MODULE=off GOCACHE="$work/cache" GOTOOLCHAIN=local \
    go build -o "$out" "$here/hfvcsim.go"
