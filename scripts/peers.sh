#!/usr/bin/env bash
# Build the real Go peers that the tests run next to flannel-xdp, at the versions pinned in
# scripts/peers.versions, into a cache that outlives the clone:
#
#   ${FXDP_CACHE:-/var/cache/flannel-xdp}/<tool>-<version>/bin/...   binaries
#   ${FXDP_CACHE:-/var/cache/flannel-xdp}/<tool>-<version>/build.log the build's output
#   ${FXDP_CACHE:-/var/cache/flannel-xdp}/<tool>-<version>/.stamp    written last, on success
#   ${FXDP_CACHE:-/var/cache/flannel-xdp}/go/                        GOPATH, module and build cache
#   ${FXDP_CACHE:-/var/cache/flannel-xdp}/peers.env                  paths, see --print-env
#
# A tool whose binaries and stamp exist is not built again, so a second run (or a second
# clone, or CI on the same machine) takes about a second. Builds are keyed by version only:
# after changing how a tool is built, delete its .stamp to rebuild it. peers.env is written by
# the last run, whatever its clone pins; --print-env always answers for this clone.
#
# Usage:
#   scripts/peers.sh [TOOL...]    build what is missing (all tools when none is named);
#                                 TOOL is one of: flanneld cni-plugins flannel-cni cnitool
#                                 kubernetes etcd
#   scripts/peers.sh --print-env  print where the binaries are, one KEY=path per line, and
#                                 build nothing (a path may not exist yet):
#       FXDP_PEERS_CACHE     the cache root
#       FXDP_FLANNELD        flanneld
#       FXDP_CNI_BIN         directory with bridge, host-local, portmap, loopback
#       FXDP_FLANNEL_CNI     the flannel CNI meta-plugin (binary named `flannel`)
#       FXDP_CNI_PATH        FXDP_CNI_BIN and the flannel plugin's directory, ':'-separated
#                            (what CNI_PATH wants)
#       FXDP_CNITOOL         cnitool
#       FXDP_KUBE_APISERVER  kube-apiserver
#       FXDP_KUBE_PROXY      kube-proxy
#       FXDP_KUBECTL         kubectl
#       FXDP_ETCD            etcd (server)
#   Python: parse those lines (KEY=VALUE, no quoting), or source <cache>/peers.env in shell.
#
# Sources: every module comes from the Go module proxy. The flannel CNI meta-plugin is the
# one the CNI project released in github.com/containernetworking/plugins (plugins/meta/flannel),
# because the proxy refuses its later home, github.com/flannel-io/cni-plugin. flanneld is built
# without its tencent-vpc backend, whose SDK the proxy refuses too.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/peers.versions
source "$here/peers.versions"

CACHE=${FXDP_CACHE:-/var/cache/flannel-xdp}
export GOPATH="$CACHE/go"
export GOMODCACHE="$CACHE/go/pkg/mod"
export GOCACHE="$CACHE/go/cache"
export GOFLAGS="-buildvcs=false -trimpath"
export GOTOOLCHAIN=local

FLANNELD_DIR="$CACHE/flanneld-$FLANNEL_VERSION"
CNI_PLUGINS_DIR="$CACHE/cni-plugins-$CNI_PLUGINS_VERSION"
FLANNEL_CNI_DIR="$CACHE/flannel-cni-$FLANNEL_CNI_VERSION"
CNITOOL_DIR="$CACHE/cnitool-$CNITOOL_VERSION"
KUBE_DIR="$CACHE/kubernetes-$KUBERNETES_VERSION"
ETCD_DIR="$CACHE/etcd-$ETCD_VERSION"

print_env() {
    cat <<EOF
FXDP_PEERS_CACHE=$CACHE
FXDP_FLANNELD=$FLANNELD_DIR/bin/flanneld
FXDP_CNI_BIN=$CNI_PLUGINS_DIR/bin
FXDP_FLANNEL_CNI=$FLANNEL_CNI_DIR/bin/flannel
FXDP_CNI_PATH=$CNI_PLUGINS_DIR/bin:$FLANNEL_CNI_DIR/bin
FXDP_CNITOOL=$CNITOOL_DIR/bin/cnitool
FXDP_KUBE_APISERVER=$KUBE_DIR/bin/kube-apiserver
FXDP_KUBE_PROXY=$KUBE_DIR/bin/kube-proxy
FXDP_KUBECTL=$KUBE_DIR/bin/kubectl
FXDP_ETCD=$ETCD_DIR/bin/etcd
EOF
}

if [[ "${1:-}" == "--print-env" ]]; then
    print_env
    exit 0
fi

say() { echo "peers: $*"; }

# run_logged LOG CMD...: append CMD's output to LOG under /usr/bin/time -v (peak memory).
run_logged() {
    local log=$1
    shift
    echo "+ $*" >>"$log"
    if [[ -x /usr/bin/time ]]; then
        /usr/bin/time -v "$@" >>"$log" 2>&1
    else
        "$@" >>"$log" 2>&1
    fi
}

# peak_rss LOG: the largest 'Maximum resident set size' in LOG, in MiB.
peak_rss() {
    awk -F: '/Maximum resident set size/ {v = $2 + 0; if (v > m) m = v}
             END {printf "%d MiB", m / 1024}' "$1"
}

# build NAME VERSION DIR FUNC BINARY...: under DIR.lock, unless DIR/.stamp and every DIR/bin/BINARY exist,
# run FUNC DIR (its output goes to DIR/build.log), then write the stamp.
build() {
    local dir=$3 lock rc=0
    mkdir -p "$dir"
    # One build of a tool at a time (two clones or CI jobs may start together).
    exec {lock}>"$dir.lock"
    flock "$lock"
    build_locked "$@" || rc=$?
    exec {lock}>&-
    return $rc
}

build_locked() {
    local name=$1 version=$2 dir=$3 func=$4
    shift 4
    local b missing=0
    for b in "$@"; do
        [[ -x "$dir/bin/$b" ]] || missing=1
    done
    if [[ $missing == 0 && -f "$dir/.stamp" ]]; then
        say "$name $version: cached ($dir)"
        return 0
    fi
    say "$name $version: building into $dir ..."
    rm -rf "${dir:?}/bin" "$dir/.stamp"
    mkdir -p "$dir/bin"
    local log="$dir/build.log" start=$SECONDS
    : >"$log"
    if ! "$func" "$dir" "$log"; then
        say "FAILED: $name $version did not build; log: $log" >&2
        # the last lines that are not /usr/bin/time's report
        grep -v -e $'^\t' -e '^Command ' "$log" | tail -n 15 | sed 's/^/  | /' >&2
        return 1
    fi
    for b in "$@"; do
        if [[ ! -x "$dir/bin/$b" ]]; then
            say "FAILED: $name $version: $dir/bin/$b was not made; log: $log" >&2
            return 1
        fi
    done
    local took=$((SECONDS - start))
    printf 'tool=%s\nversion=%s\nseconds=%s\npeak_rss=%s\nbuilt=%s\ngo=%s\n' \
        "$name" "$version" "$took" "$(peak_rss "$log")" "$(date -u +%FT%TZ)" \
        "$(go env GOVERSION)" >"$dir/.stamp"
    say "$name $version: built in ${took}s (peak RSS $(peak_rss "$log"))"
}

build_flanneld() {
    local dir=$1 log=$2
    local src="$dir/src" v=$FLANNEL_VERSION mod=github.com/flannel-io/flannel
    # `go install github.com/flannel-io/flannel@v...` fails here: the module proxy refuses
    # (403) github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/vpc, which only the
    # tencent-vpc backend imports. So build flannel's own main.go, less that one import, in a
    # wrapper module that requires flannel at the pinned version: every other backend
    # (vxlan, host-gw, udp, wireguard, ipsec, ipip, extension, alloc) is in.
    rm -rf "$src"
    mkdir -p "$src"
    local moddir
    moddir=$(cd "$src" && go mod download -json "$mod@$v" |
        sed -n 's/^\t"Dir": "\(.*\)",$/\1/p') || return 1
    [[ -f "$moddir/main.go" ]] || {
        echo "no main.go in $mod@$v ($moddir)" >>"$log"
        return 1
    }
    grep -v '"github.com/flannel-io/flannel/pkg/backend/tencentvpc"$' "$moddir/main.go" \
        >"$src/main.go"
    cp "$moddir/go.sum" "$src/go.sum"
    chmod u+w "$src/go.sum"
    {
        echo "module flannel-xdp.local/peers/flanneld"
        echo
        grep -E '^go ' "$moddir/go.mod"
        echo
        echo "require $mod $v"
    } >"$src/go.mod"
    # cgo on amd64, as upstream does, for the udp backend.
    (cd "$src" && CGO_ENABLED=1 GOFLAGS="$GOFLAGS -mod=mod" run_logged "$log" go build \
        -ldflags "-s -w -X $mod/pkg/version.Version=$v" -o "$dir/bin/flanneld" .)
}

build_cni_plugins() {
    local dir=$1 log=$2 p
    local ld="-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion"
    ld+="=$CNI_PLUGINS_VERSION"
    for p in plugins/main/bridge plugins/ipam/host-local plugins/meta/portmap \
        plugins/main/loopback; do
        (cd "$dir" && CGO_ENABLED=0 GOBIN="$dir/bin" run_logged "$log" go install \
            -ldflags "$ld" "github.com/containernetworking/plugins/$p@$CNI_PLUGINS_VERSION") ||
            return 1
    done
}

build_cnitool() {
    local dir=$1 log=$2
    (cd "$dir" && CGO_ENABLED=0 GOBIN="$dir/bin" run_logged "$log" go install -ldflags "-s -w" \
        "github.com/containernetworking/cni/cnitool@$CNITOOL_VERSION")
}

build_flannel_cni() {
    local dir=$1 log=$2
    local mod=github.com/containernetworking/plugins
    (cd "$dir" && CGO_ENABLED=0 GOBIN="$dir/bin" run_logged "$log" go install -ldflags \
        "-s -w -X $mod/pkg/utils/buildversion.BuildVersion=$FLANNEL_CNI_VERSION" \
        "$mod/plugins/meta/flannel@$FLANNEL_CNI_VERSION")
}

build_etcd() {
    local dir=$1 log=$2
    local src="$dir/src"
    rm -rf "$src"
    mkdir -p "$src"
    # go.etcd.io/etcd/v3 (the etcd command) replaces its sibling modules with ../ paths, so
    # `go install` refuses it; a tiny main over etcdmain builds the same server.
    cat >"$src/main.go" <<'EOF'
// etcd server built by flannel-xdp's scripts/peers.sh.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
    cat >"$src/go.mod" <<EOF
module flannel-xdp.local/peers/etcd

go $(go env GOVERSION | sed 's/^go//')
EOF
    (cd "$src" && run_logged "$log" go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION") || return 1
    (cd "$src" && run_logged "$log" go mod tidy) || return 1
    (cd "$src" && CGO_ENABLED=0 run_logged "$log" go build -ldflags "-s -w" \
        -o "$dir/bin/etcd" .)
}

build_kubernetes() {
    local dir=$1 log=$2
    local src="$dir/src" v=$KUBERNETES_VERSION
    rm -rf "$src"
    mkdir -p "$src"
    # k8s.io/kubernetes replaces its staging modules (k8s.io/api, k8s.io/client-go, ...) with
    # ./staging paths and requires them at v0.0.0, so `go install` refuses it. A wrapper module
    # requires k8s.io/kubernetes and replaces each staging module with its published v0.Y.Z.
    local modfile
    modfile=$(cd "$src" && go mod download -json "k8s.io/kubernetes@$v" |
        sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p') || return 1
    [[ -f "$modfile" ]] || {
        echo "no go.mod for k8s.io/kubernetes@$v" >>"$log"
        return 1
    }
    local staging
    staging=$(sed -n 's#^\s*\(k8s\.io/[^ ]*\) => \./staging/.*#\1#p' "$modfile")
    {
        echo "module flannel-xdp.local/peers/kubernetes"
        echo
        grep -E '^(go|godebug) ' "$modfile"
        echo
        echo "require k8s.io/kubernetes $v"
        echo
        echo "replace ("
        local m
        for m in $staging; do
            echo "	$m => $m v0.${v#v1.}"
        done
        echo ")"
    } >"$src/go.mod"
    cat "$src/go.mod" >>"$log"
    local cmds=(kube-apiserver kube-proxy kubectl) c
    local gets=()
    for c in "${cmds[@]}"; do gets+=("k8s.io/kubernetes/cmd/$c@$v"); done
    (cd "$src" && run_logged "$log" go get "${gets[@]}") || return 1
    # The version ldflags of hack/lib/version.sh, so --version names the release.
    local commit date minor=${v#v1.}
    minor=${minor%%.*}
    commit=$(cd "$src" && go list -m -f '{{with .Origin}}{{.Hash}}{{end}}' \
        "k8s.io/kubernetes@$v")
    date=$(cd "$src" && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' \
        k8s.io/kubernetes)
    local ld="-s -w" pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
        # The proxy gives no commit (Origin) for k8s.io/kubernetes; use it where it does.
        [[ -z "$commit" ]] || ld+=" -X $pkg.gitCommit=$commit"
    done
    for c in "${cmds[@]}"; do
        local t=$SECONDS
        (cd "$src" && CGO_ENABLED=0 run_logged "$log" go build -ldflags "$ld" \
            -o "$dir/bin/$c" "k8s.io/kubernetes/cmd/$c") || return 1
        echo "peers: $c built in $((SECONDS - t))s" | tee -a "$log"
    done
}

ALL=(flanneld cni-plugins flannel-cni cnitool kubernetes etcd)
want=("$@")
[[ ${#want[@]} -gt 0 ]] || want=("${ALL[@]}")

mkdir -p "$CACHE"
total=$SECONDS
rc=0
for t in "${want[@]}"; do
    case $t in
    flanneld) build flanneld "$FLANNEL_VERSION" "$FLANNELD_DIR" build_flanneld flanneld ;;
    cni-plugins)
        build cni-plugins "$CNI_PLUGINS_VERSION" "$CNI_PLUGINS_DIR" build_cni_plugins \
            bridge host-local portmap loopback
        ;;
    flannel-cni) build flannel-cni "$FLANNEL_CNI_VERSION" "$FLANNEL_CNI_DIR" build_flannel_cni flannel ;;
    cnitool) build cnitool "$CNITOOL_VERSION" "$CNITOOL_DIR" build_cnitool cnitool ;;
    kubernetes)
        build kubernetes "$KUBERNETES_VERSION" "$KUBE_DIR" build_kubernetes \
            kube-apiserver kube-proxy kubectl
        ;;
    etcd) build etcd "$ETCD_VERSION" "$ETCD_DIR" build_etcd etcd ;;
    *)
        say "unknown tool '$t' (known: ${ALL[*]})" >&2
        exit 2
        ;;
    esac || rc=1
done

print_env >"$CACHE/peers.env"
if [[ $rc != 0 ]]; then
    say "NOT ready: see the FAILED lines above (cache $CACHE)" >&2
    exit 1
fi
say "ready in $((SECONDS - total))s (cache $CACHE)"
