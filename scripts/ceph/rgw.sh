#!/usr/bin/env bash
# A single-node Ceph cluster with an RGW (S3) on loopback, for the tests:
# one mon, one OSD and one radosgw, in their own state directory and config
# file (nothing under /etc/ceph, no systemd).
#
#   scripts/ceph/rgw.sh start    idempotent: returns at once when RGW answers
#   scripts/ceph/rgw.sh stop     kills the daemons, removes the state
#   scripts/ceph/rgw.sh status   exit 0 when RGW answers
#   scripts/ceph/rgw.sh env      shell exports for the AWS SDK and CLI
#
# The OSD uses memstore: the tests need no durability, and it saves the
# bluestore mkfs of a block file. Its objects are lost when it stops.
# Environment: BOOTCACHE_CEPH_DIR (default /var/tmp/bootcache-ceph),
# BOOTCACHE_RGW_PORT (default 7480), BOOTCACHE_CEPH_MON_PORT (default 6799).
set -euo pipefail

DIR=${BOOTCACHE_CEPH_DIR:-/var/tmp/bootcache-ceph}
RGW_PORT=${BOOTCACHE_RGW_PORT:-7480}
MON_PORT=${BOOTCACHE_CEPH_MON_PORT:-6799}
CONF=$DIR/ceph.conf
ACCESS_KEY=bootcachetestaccess
SECRET_KEY=bootcachetestsecretkey0123456789
ENDPOINT=http://127.0.0.1:$RGW_PORT

ceph_() { timeout 30 ceph --conf "$CONF" "$@"; }

answers() { curl -fsS -o /dev/null --max-time 2 "$ENDPOINT" 2>/dev/null || [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$ENDPOINT" 2>/dev/null)" = 403 ]; }

fail() {
  echo "rgw.sh: $*" >&2
  for log in "$DIR"/log/*.log; do
    [ -f "$log" ] && { echo "--- $log" >&2; tail -n 15 "$log" >&2; }
  done
  exit 1
}

start() {
  if answers; then return 0; fi
  for tool in ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool ceph-authtool curl; do
    command -v "$tool" >/dev/null || fail "$tool is not installed (bash scripts/install-deps.sh)"
  done
  stop_daemons
  rm -rf "$DIR"
  mkdir -p "$DIR"/{mon,osd,rgw,log,run}
  local fsid started
  fsid=$(cat /proc/sys/kernel/random/uuid)
  started=$(date +%s)
  cat >"$CONF" <<CONF
[global]
fsid = $fsid
mon host = 127.0.0.1:$MON_PORT
mon initial members = a
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/keyring
run dir = $DIR/run
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
mon pg warn min per osd = 0
[mon.a]
mon data = $DIR/mon
[osd.0]
osd data = $DIR/osd
osd objectstore = memstore
memstore device bytes = 2147483648
osd max object name len = 256
osd max object namespace len = 64
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw data = $DIR/rgw
rgw dns name = 127.0.0.1
rgw thread pool size = 64
CONF
  ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$DIR/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  monmaptool --create --add a "127.0.0.1:$MON_PORT" --fsid "$fsid" "$DIR/monmap" >/dev/null
  ceph-mon --conf "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring" || fail "ceph-mon --mkfs failed"
  ceph-mon --conf "$CONF" -i a || fail "ceph-mon did not start"
  local osd_uuid
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  ceph_ osd new "$osd_uuid" 0 >/dev/null || fail "ceph osd new failed"
  ceph_ auth get-or-create osd.0 mon 'allow profile osd' osd 'allow *' mgr 'allow profile osd' >"$DIR/osd/keyring"
  ceph-osd --conf "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" --keyring "$DIR/osd/keyring" >/dev/null 2>&1 || fail "ceph-osd --mkfs failed"
  ceph-osd --conf "$CONF" -i 0 --keyring "$DIR/osd/keyring" 2>>"$DIR/log/osd.0.stderr" || fail "ceph-osd did not start"
  ceph_ auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' >"$DIR/rgw/keyring"
  local i
  for i in $(seq 1 60); do
    ceph_ osd stat 2>/dev/null | grep -q '1 up' && break
    sleep 1
  done
  ceph_ osd stat | grep -q '1 up' || fail "the OSD did not come up"
  radosgw --conf "$CONF" -n client.rgw.a --keyring "$DIR/rgw/keyring" || fail "radosgw did not start"
  for i in $(seq 1 120); do
    answers && break
    sleep 1
  done
  answers || fail "RGW does not answer on $ENDPOINT"
  timeout 60 radosgw-admin --conf "$CONF" user create --uid=bootcache --display-name=bootcache \
    --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null || fail "radosgw-admin user create failed"
  echo "rgw.sh: RGW on $ENDPOINT ($(($(date +%s) - started)) s)" >&2
}

stop_daemons() {
  pkill -f -- "--conf $CONF" 2>/dev/null || true
  local i
  for i in $(seq 1 20); do
    pgrep -f -- "--conf $CONF" >/dev/null || return 0
    sleep 0.5
  done
  pkill -9 -f -- "--conf $CONF" 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) stop_daemons; rm -rf "$DIR" ;;
  status) answers ;;
  env)
    echo "export AWS_ENDPOINT_URL=$ENDPOINT"
    echo "export AWS_ACCESS_KEY_ID=$ACCESS_KEY"
    echo "export AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
    echo "export AWS_REGION=us-east-1"
    ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
