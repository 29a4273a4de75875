#!/usr/bin/env bash
# Idempotent machine set-up: Debian packages, kernel headers for bcc, the venv.
# Fast when everything is already in place (each step checks before it acts).
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  python3-bpfcc bpfcc-tools libbpfcc bpftool python3-venv python3-wheel
  linux-headers-amd64 iproute2 ethtool iperf3 sockperf
  etcd-server etcd-client iptables conntrack iputils-ping prometheus tcpdump procps openssl curl util-linux
)

log() { printf 'setup: %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (installs Debian packages and uses BPF)" >&2
    exit 1
  fi
}

install_debs() {
  local missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  need_root
  log "installing Debian packages: ${missing[*]}"
  # PID 1 is not systemd here; keep package scripts from starting daemons
  # (etcd, prometheus): tests start their own on chosen loopback ports.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  [ "$created_policy" -eq 1 ] && rm -f "$policy"
  return 0
}

link_kernel_headers() {
  # bcc needs /lib/modules/$(uname -r)/build; this kernel ships no headers,
  # so point it at Debian's generic headers. bpf/ uses only uapi headers,
  # which makes the version skew harmless.
  local mod="/lib/modules/$(uname -r)"
  [ -e "$mod/build/include" ] && return 0
  need_root
  local build common
  build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$build" ] || [ -z "$common" ]; then
    echo "setup: linux-headers-amd64 is installed but no headers found under /usr/src" >&2
    exit 1
  fi
  mkdir -p "$mod"
  ln -sfn "$build" "$mod/build"
  ln -sfn "$common" "$mod/source"
  log "linked $mod/build -> $build"
}

package_files() {
  # Every file the package is made of (pyproject.toml's package-dir folders).
  find core agent bench bpf cli lab loader maps metrics node registry \
    \( -name '*.py' -o -name '*.c' -o -name '*.h' \) 2>/dev/null | sort || true
}

make_venv() {
  local stamp=.venv/.setup-stamp
  local want
  # Strict editable mode links each module file into build/: a module added or
  # removed needs a reinstall, so the list of files is part of the stamp.
  want=$( { cat pyproject.toml constraints.txt; package_files; } | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/flannel-xdp ]; then
    return 0
  fi
  log "creating venv .venv (system python, for bcc)"
  [ -x .venv/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt \
    --config-settings editable_mode=strict -e '.[dev]'
  .venv/bin/python -c 'import bcc, pyroute2, prometheus_client' \
    || { echo "setup: venv cannot import bcc/pyroute2/prometheus_client" >&2; exit 1; }
  echo "$want" >"$stamp"
}

install_debs
link_kernel_headers
make_venv
log "ready"
