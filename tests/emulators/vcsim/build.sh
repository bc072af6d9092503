#!/usr/bin/env bash
# Builds rehost-vcsim (this folder's Go sources on top of Debian's govmomi package, GOPATH
# mode) into ${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}/vcsim/rehost-vcsim, only
# when the sources changed (a stamp holds their hash). Installs golang-go and
# golang-github-vmware-govmomi-dev when missing (as root; otherwise says what to run).
set -euo pipefail

src=$(cd "$(dirname "$0")" && pwd)
home=${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}
out="$home/vcsim/rehost-vcsim"
stamp="$home/vcsim/.sources-sha256"
gocode=/usr/share/gocode

need_apt=()
command -v go >/dev/null 2>&1 || need_apt+=(golang-go)
[[ -d $gocode/src/github.com/vmware/govmomi/simulator ]] || need_apt+=(golang-github-vmware-govmomi-dev)
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils) # ExportVm converts with it
if ((${#need_apt[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing: ${need_apt[*]} (run: sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

sum=$( (cd "$src" && cat ./*.go; go version; dpkg-query -W -f='${Version}' golang-github-vmware-govmomi-dev 2>/dev/null || true) | sha256sum | cut -d' ' -f1)
if [[ -x $out && -f $stamp && "$(cat "$stamp")" == "$sum" ]]; then
  exit 0
fi
mkdir -p "$home/vcsim"
# go needs a build cache; CI shells may have no HOME.
[[ -n ${GOCACHE:-} || -n ${HOME:-} || -n ${XDG_CACHE_HOME:-} ]] || export GOCACHE="$home/vcsim/gocache"
# GOPATH mode: the package lives outside GOPATH, its imports resolve in Debian's gocode.
(cd "$src" && GO111MODULE=off GOPATH="$gocode" GOFLAGS= go build -o "$out.tmp" .)
mv "$out.tmp" "$out"
echo "$sum" >"$stamp"
echo "built $out" >&2
