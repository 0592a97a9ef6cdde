#!/usr/bin/env bash
# Installs bootcache's system and npm dependencies (idempotent; needs root for apt).
#   --bench  also the peers of the fleet benchmark (bench/fleet.js, docs/benchmarks-fleet.md):
#            nbdkit's S3 plugin (python + boto3) and QEMU's curl block driver; not needed by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v fio >/dev/null || need+=(fio)
# A single-node Ceph 16 with an S3 gateway for the tests (scripts/ceph/rgw.sh);
# ceph-base comes with ceph-mon, ceph-common has ceph, radosgw-admin and
# ceph-authtool. No ceph-mgr: the tests' cluster works without one.
command -v ceph-mon >/dev/null || need+=(ceph-mon)
command -v ceph-osd >/dev/null || need+=(ceph-osd)
command -v radosgw >/dev/null || need+=(radosgw)
command -v radosgw-admin >/dev/null || need+=(ceph-common)
command -v curl >/dev/null || need+=(curl)
command -v man >/dev/null || need+=(man-db)
# systemd-analyze and systemd-socket-activate for the unit tests (no systemd as PID 1 needed).
command -v systemd-socket-activate >/dev/null || need+=(systemd)
# promtool and a Prometheus server for the metrics tests.
command -v promtool >/dev/null || need+=(prometheus)
command -v uuidgen >/dev/null || need+=(uuid-runtime)
# virt-xml-validate (and its xmllint) checks the libvirt XML in the docs.
command -v virt-xml-validate >/dev/null || need+=(libvirt-clients)
command -v xmllint >/dev/null || need+=(libxml2-utils)
# psktool and certtool make the TLS tests' keys and certificates.
command -v psktool >/dev/null || need+=(gnutls-bin)
if [ "${1:-}" = --bench ]; then
  # The fleet bench's peers: nbdkit S3 (a python plugin using boto3) and QEMU's http/https driver.
  dpkg -s nbdkit-plugin-python >/dev/null 2>&1 || need+=(nbdkit-plugin-python)
  python3 -c 'import boto3' 2>/dev/null || need+=(python3-boto3)
  dpkg -s qemu-block-extra >/dev/null 2>&1 || need+=(qemu-block-extra)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# A symlinked node_modules (a git worktree sharing another checkout's) is left
# alone: npm ci would empty the directory it points to and then replace the link.
if [ -L node_modules ]; then
  echo "node_modules links to $(readlink node_modules): not running npm ci here"
elif [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
