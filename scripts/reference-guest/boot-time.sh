#!/usr/bin/env bash
# Boot disk images of the reference guest in QEMU and time each boot, from
# QEMU's start to the marker line BOOTCACHE-BOOT-COMPLETE on the serial console
# and to the serial login prompt. The disk is opened with snapshot=on, so the
# image is never written.
#
# Usage: boot-time.sh [options] IMAGE...
#   --accel kvm|tcg   accelerator (default: what scripts/detect-accel.sh says)
#   --runs N          boots per image (default 1)
#   --timeout S       give up on one boot after S seconds (default 300)
#   --no-login        stop at the marker, do not wait for the login prompt
#   --serial-dir DIR  keep each boot's serial log there
#   --json            one JSON object per boot on stdout instead of a table
# The guest gets: -m 1024 -smp 2, the disk as virtio (format from its header),
# QEMU's default user-mode NIC, no display. Exit status: 0 if every boot
# reached the marker (and the prompt, unless --no-login), 1 otherwise.
# Besides wall-clock seconds, each boot reports the CPU seconds QEMU had used
# when the marker appeared (cpu_s) and the host's 1-minute load average at
# its start: under TCG the wall time grows with other load on the host, the
# CPU time much less.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

accel="" runs=1 timeout_s=300 want_login=1 serial_dir="" json=0
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --accel) accel=${2:?--accel needs kvm or tcg}; shift 2 ;;
    --runs) runs=${2:?--runs needs a number}; shift 2 ;;
    --timeout) timeout_s=${2:?--timeout needs seconds}; shift 2 ;;
    --no-login) want_login=0; shift ;;
    --serial-dir) serial_dir=${2:?--serial-dir needs a directory}; shift 2 ;;
    --json) json=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "boot-time: unknown option: $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || { usage >&2; exit 2; }
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "boot-time: --runs must be a positive integer" >&2; exit 2; }
[[ $timeout_s =~ ^[1-9][0-9]*$ ]] || { echo "boot-time: --timeout must be a positive integer" >&2; exit 2; }
for img in "$@"; do
  [[ -r $img ]] || { echo "boot-time: image not readable: $img" >&2; exit 2; }
done
if [[ -z $accel ]]; then accel=$("$HERE/../detect-accel.sh"); fi
[[ $accel == kvm || $accel == tcg ]] || { echo "boot-time: --accel must be kvm or tcg" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "boot-time: qemu-system-x86_64 not found (apt-get install qemu-system-x86)" >&2; exit 2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/boot-time.XXXXXX")
qemu_pid=""
cleanup() {
  if [[ -n $qemu_pid ]]; then rg_stop "$qemu_pid"; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [[ -n $serial_dir ]]; then mkdir -p "$serial_dir"; fi

failures=0
if [[ $json == 0 ]]; then
  printf '%-28s %-6s %-5s %4s %9s %9s %7s %6s\n' image format accel run marker_s login_s cpu_s load1
fi
for img in "$@"; do
  fmt=$(rg_image_format "$img")
  name=$(basename "$img")
  for ((run = 1; run <= runs; run++)); do
    serial="$tmp/$name.$run.serial"
    : >"$serial"
    read -r load1 _ </proc/loadavg
    start=$(rg_now_us)
    deadline=$((start + timeout_s * 1000000))
    qemu-system-x86_64 -accel "$accel" -m 1024 -smp 2 \
      -display none -monitor none -no-reboot -serial "file:$serial" \
      -drive "file=$img,format=$fmt,if=virtio,snapshot=on" \
      </dev/null >"$tmp/qemu.out" 2>&1 &
    qemu_pid=$!
    marker_s="" login_s="" cpu_s="" error=""
    if rg_wait_for "$qemu_pid" "$serial" "$RG_MARKER" "$deadline"; then
      marker_s=$(rg_seconds_since "$start")
      cpu_s=$(rg_cpu_seconds "$qemu_pid")
      if [[ $want_login == 1 ]]; then
        if rg_wait_for "$qemu_pid" "$serial" "$RG_LOGIN_PATTERN" "$deadline"; then
          login_s=$(rg_seconds_since "$start")
        else
          error="no login prompt within ${timeout_s}s"
        fi
      fi
    else
      case $? in
        1) error="QEMU exited before the marker: $(head -n1 "$tmp/qemu.out")" ;;
        *) error="no marker within ${timeout_s}s" ;;
      esac
    fi
    rg_stop "$qemu_pid"
    qemu_pid=""
    if [[ -n $serial_dir ]]; then cp "$serial" "$serial_dir/"; fi
    if [[ -n $error ]]; then
      failures=$((failures + 1))
      {
        echo "boot-time: $name run $run: $error; last serial lines:"
        rg_tail "$serial" | sed 's/^/  | /'
      } >&2
    fi
    if [[ $json == 1 ]]; then
      printf '{"image":"%s","format":"%s","accel":"%s","run":%d,"markerSeconds":%s,"loginSeconds":%s,"qemuCpuSeconds":%s,"hostLoad1":%s,"ok":%s}\n' \
        "$img" "$fmt" "$accel" "$run" "${marker_s:-null}" "${login_s:-null}" "${cpu_s:-null}" "$load1" \
        "$([[ -z $error ]] && echo true || echo false)"
    else
      printf '%-28s %-6s %-5s %4d %9s %9s %7s %6s\n' "$name" "$fmt" "$accel" "$run" "${marker_s:--}" "${login_s:--}" "${cpu_s:--}" "$load1"
    fi
  done
done
[[ $failures == 0 ]]
