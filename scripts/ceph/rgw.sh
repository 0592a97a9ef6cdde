#!/usr/bin/env bash
# A real single-node Ceph (Pacific, 16) cluster with an S3 gateway (RGW) for
# the tests: one mon, one OSD, one radosgw, all in a state dir with their own
# config file, run as background daemons (no systemd, nothing under /etc/ceph).
#
#   scripts/ceph/rgw.sh start    start it (idempotent; waits until S3 answers)
#   scripts/ceph/rgw.sh stop     stop every daemon it started
#   scripts/ceph/rgw.sh status   exit 0 when running and answering, else 1
#   scripts/ceph/rgw.sh env      shell exports for an S3 client
#
# Environment: BOOTCACHE_CEPH_DIR (state dir, default /var/tmp/bootcache-ceph),
# BOOTCACHE_RGW_PORT (S3 port, default 7480), BOOTCACHE_CEPH_MON_PORT (mon,
# msgr2 only, default 13300 so a real cluster's 3300/6789 stay free),
# BOOTCACHE_CEPH_MEMSTORE_BYTES (the OSD's RAM store, default 2 GiB).
set -euo pipefail

DIR=${BOOTCACHE_CEPH_DIR:-/var/tmp/bootcache-ceph}
RGW_PORT=${BOOTCACHE_RGW_PORT:-7480}
MON_PORT=${BOOTCACHE_CEPH_MON_PORT:-13300}
MEMSTORE_BYTES=${BOOTCACHE_CEPH_MEMSTORE_BYTES:-2147483648}
[[ $MEMSTORE_BYTES =~ ^[0-9]+$ ]] || { echo "rgw.sh: bad BOOTCACHE_CEPH_MEMSTORE_BYTES: $MEMSTORE_BYTES" >&2; exit 1; }
for port in "$RGW_PORT" "$MON_PORT"; do
  [[ $port =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || { echo "rgw.sh: bad port: $port" >&2; exit 1; }
done
CONF=$DIR/ceph.conf
KEYRING=$DIR/keyring
ENDPOINT=http://127.0.0.1:$RGW_PORT
# Fixed test credentials (this gateway only listens on 127.0.0.1).
ACCESS_KEY=BOOTCACHETESTACCESS0
SECRET_KEY=bootcacheTestSecretKey0000000000000000000
S3_UID=bootcache-test
CLI_TIMEOUT=30 # seconds for any one ceph CLI call
RGW_WAIT=120   # seconds for the gateway to answer after its daemons start
DAEMONS=(mon.a osd.0 client.rgw.a)
CONF_MARK="# written by bootcache scripts/ceph/rgw.sh"

die() {
  echo "rgw.sh: $*" >&2
  exit 1
}

ceph_cli() { timeout "$CLI_TIMEOUT" ceph -c "$CONF" --connect-timeout 20 "$@"; }
rgw_admin() { timeout "$CLI_TIMEOUT" radosgw-admin -c "$CONF" "$@"; }

pid_of() { # prints the live pid of daemon $1, or fails
  local f=$DIR/run/$1.pid pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null || return 1
  # The pid must still be our daemon (run with our config), not a reused number.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-c $CONF " || return 1
  echo "$pid"
}

answering() { # RGW answers S3 on its port (any HTTP status counts)
  local code
  code=$(curl -s -o /dev/null -m 3 -w '%{http_code}' "$ENDPOINT/" 2>/dev/null) || return 1
  [ "$code" != 000 ]
}

running() {
  local d
  for d in "${DAEMONS[@]}"; do pid_of "$d" >/dev/null || return 1; done
  [ -f "$DIR/user.done" ] && answering
}

log_tails() {
  local d
  for d in "${DAEMONS[@]}"; do
    [ -f "$DIR/log/$d.log" ] || continue
    echo "--- last lines of $DIR/log/$d.log" >&2
    tail -n 25 "$DIR/log/$d.log" >&2
  done
}

fail() {
  echo "rgw.sh: $*" >&2
  log_tails
  exit 1
}

stop_daemon() { # SIGTERM, up to 10 s to exit, then SIGKILL
  local pid i
  pid=$(pid_of "$1") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

stop_daemons() {
  # One after the other, the mon last: the OSD tells the mon it is going
  # down, so the next start does not wait for the mon to find that out.
  stop_daemon client.rgw.a
  stop_daemon osd.0
  stop_daemon mon.a
  rm -f "$DIR"/run/*.pid
}

write_conf() {
  local fsid=$1
  cat >"$CONF" <<EOF
$CONF_MARK
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$MON_PORT]
mon initial members = a
ms bind msgr1 = false
# Every daemon listens on loopback only.
public addr = 127.0.0.1
cluster addr = 127.0.0.1
keyring = $KEYRING
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
log to stderr = false
# One OSD: every pool keeps one copy, CRUSH picks OSDs not hosts.
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
# Few PGs per pool, no mgr to autoscale them: fast pool creation.
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon warn on pool no redundancy = false
# The shared disk may be well filled: the mon must not stop on its free space.
mon data avail warn = 2
mon data avail crit = 1
err to stderr = false
auth allow insecure global id reclaim = false

[mon]
# Commit map changes at once, not once a second: RGW's first start makes
# pools one mon command after another (about 9 s with the defaults).
paxos propose interval = 0.05
paxos min wait = 0.01
mon data = $DIR/mon
mon cluster log file = $DIR/log/cluster.log

[osd]
osd data = $DIR/osd
# memstore: objects live in RAM (at most $MEMSTORE_BYTES bytes) and are gone at stop. The
# tests need no durability, and the shared disk here is well filled, so the
# gateway's objects never touch it.
osd objectstore = memstore
memstore device bytes = $MEMSTORE_BYTES
osd memory target = 1073741824
osd crush update on start = true

[client.rgw.a]
# Without tcp_nodelay a small GET waits for a delayed ACK: about 48 ms instead of 4.
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT tcp_nodelay=1
# Overwritten and deleted objects leave the OSD within seconds, not 2 hours.
rgw gc obj min wait = 10
rgw gc processor period = 10
rgw data = $DIR/rgw
rgw thread pool size = 64
EOF
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

create_cluster() {
  local fsid uuid id
  stop_daemons
  # Only ever wipe a state dir this script made.
  if [ -n "$(ls -A "$DIR" 2>/dev/null)" ] && ! grep -qxF "$CONF_MARK" "$CONF" 2>/dev/null; then
    die "$DIR holds files rgw.sh did not write; remove it or set BOOTCACHE_CEPH_DIR"
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR"/{run,log,mon,osd,rgw}
  fsid=$(uuidgen)
  write_conf "$fsid"
  # Every key goes in one keyring; mkfs imports them all into the mon's auth db.
  ceph-authtool "$KEYRING" --create-keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$KEYRING" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
  ceph-authtool "$KEYRING" --gen-key -n osd.0 \
    --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
  ceph-authtool "$KEYRING" --gen-key -n client.rgw.a \
    --cap mon 'allow rw' --cap osd 'allow rwx' --cap mgr 'allow rw'
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$MON_PORT]" "$DIR/monmap" >/dev/null
  timeout "$CLI_TIMEOUT" ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" --keyring "$KEYRING" ||
    fail "ceph-mon --mkfs failed"
  start_mon
  uuid=$(uuidgen)
  id=$(ceph_cli osd new "$uuid") || fail "ceph osd new failed"
  [ "$id" = 0 ] || fail "ceph osd new gave osd.$id, expected osd.0"
  timeout 120 ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" >"$DIR/log/osd-mkfs.log" 2>&1 ||
    fail "ceph-osd --mkfs failed (see $DIR/log/osd-mkfs.log)"
  # The monmap holds the mon's port: a new port needs a new cluster.
  echo "$MON_PORT" >"$DIR/cluster.done"
}

start_mon() {
  pid_of mon.a >/dev/null && return
  ceph-mon -c "$CONF" -i a 9>&- || fail "ceph-mon did not start"
  ceph_cli mon stat >/dev/null || fail "ceph-mon does not answer on 127.0.0.1:$MON_PORT"
}

start_daemons() {
  start_mon
  if ! pid_of osd.0 >/dev/null; then
    ceph-osd -c "$CONF" -i 0 9>&- || fail "ceph-osd did not start"
  fi
  if ! pid_of client.rgw.a >/dev/null; then
    radosgw -c "$CONF" -n client.rgw.a 9>&- || fail "radosgw did not start"
  fi
  local i
  for ((i = 0; i < RGW_WAIT * 5; i++)); do
    answering && return
    pid_of client.rgw.a >/dev/null || fail "radosgw exited"
    pid_of osd.0 >/dev/null || fail "ceph-osd exited"
    sleep 0.2
  done
  fail "radosgw did not answer on $ENDPOINT within ${RGW_WAIT}s"
}

create_user() {
  [ -f "$DIR/user.done" ] && return
  if ! rgw_admin user info --uid="$S3_UID" >/dev/null 2>&1; then
    rgw_admin user create --uid="$S3_UID" --display-name="bootcache tests" \
      --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null ||
      fail "radosgw-admin user create failed"
  fi
  touch "$DIR/user.done"
}

cmd_start() {
  for b in ceph ceph-mon ceph-osd radosgw radosgw-admin ceph-authtool monmaptool curl uuidgen; do
    command -v "$b" >/dev/null || die "$b is not installed (run scripts/install-deps.sh)"
  done
  mkdir -p "$DIR"
  # One start at a time (parallel test workers may all call start).
  # The daemons are started with 9>&- so they do not inherit the lock.
  exec 9>"$DIR.lock"
  flock -w 300 9 || die "another rgw.sh start holds $DIR.lock"
  if running; then return; fi
  local t0=$SECONDS
  stop_daemons # a partly running cluster starts again from the top
  port_busy "$MON_PORT" && die "127.0.0.1:$MON_PORT is in use by another program (set BOOTCACHE_CEPH_MON_PORT)"
  port_busy "$RGW_PORT" && die "127.0.0.1:$RGW_PORT is in use by another program (set BOOTCACHE_RGW_PORT)"
  # A failed start leaves nothing running.
  trap '[ $? = 0 ] || stop_daemons' EXIT
  # memstore keeps nothing across a stop: every start makes a new cluster.
  create_cluster
  start_daemons
  create_user
  trap - EXIT
  echo "rgw.sh: Ceph RGW answering on $ENDPOINT (state in $DIR, started in $((SECONDS - t0))s)" >&2
}

cmd_stop() {
  [ -d "$DIR" ] || return 0
  exec 9>"$DIR.lock"
  flock -w 300 9 || die "an rgw.sh start holds $DIR.lock"
  stop_daemons
}

cmd_env() {
  cat <<EOF
export AWS_ENDPOINT_URL=$ENDPOINT
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_REGION=us-east-1
EOF
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status)
    if running; then echo "running: $ENDPOINT (state in $DIR)"; else echo "not running"; exit 1; fi
    ;;
  env) cmd_env ;;
  *) die "usage: rgw.sh start|stop|status|env" ;;
esac
