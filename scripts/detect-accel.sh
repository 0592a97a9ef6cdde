#!/usr/bin/env bash
# Decide which QEMU accelerator really works on this host: prints `kvm` or `tcg`
# on stdout, and one line saying why on stderr. Always exits 0 (2 on bad usage).
#
# /dev/kvm existing is not enough: on some hosts (nested virtualisation) guests
# hang under KVM. So we boot a probe guest under `-accel kvm` and watch it make
# progress, with hard deadlines; see docs/reference-guest.md ("Accelerator
# detection") for the method, which `bootcache profile` ports to TypeScript.
#
#   Stage 1 (firmware): no disk, no kernel. SeaBIOS writes its banner to the
#     ISA debug console (port 0x402) within milliseconds of the first
#     instruction. No "SeaBIOS" there within 3 s -> tcg.
#   Stage 2 (kernel), when a kernel is at hand (--kernel, the reference guest's
#     vmlinuz, or the host's /boot/vmlinuz): direct kernel boot with no initrd
#     and `panic=-1`. The kernel walks its whole init (timers, SMP bring-up,
#     device probe), fails to mount a root fs and prints "Kernel panic" on
#     ttyS0 (then resets; -no-reboot makes QEMU exit). "Kernel panic" on the
#     serial console within 5 s -> kvm. Else, if the console (earlycon, so it
#     starts at the first kernel instruction) grew in the last 1.5 s, the
#     kernel is running, just slowly (loaded host) -> kvm; silent -> tcg.
#     QEMU exiting alone is no proof: a triple fault also ends it.
#
# Usage: detect-accel.sh [--kernel VMLINUZ] [--verbose]
# Env:   BOOTCACHE_ACCEL=kvm|tcg   skip the probe and use this answer
#        BOOTCACHE_REF_DIR         where build.sh put the reference guest
# Test hooks (not for normal use): --probe-accel ACCEL probes with another
#        accelerator (e.g. tcg, to exercise the "works" path on a host without
#        KVM); BOOTCACHE_DETECT_QEMU_EXTRA adds QEMU arguments (e.g. -S freezes
#        the guest, to exercise the "hangs" path);
#        BOOTCACHE_DETECT_FIRMWARE_DEADLINE_S / _KERNEL_DEADLINE_S change the
#        deadlines (3 s / 5 s). Worst case run time: both deadlines + 2 s.
set -euo pipefail

FIRMWARE_DEADLINE_S=${BOOTCACHE_DETECT_FIRMWARE_DEADLINE_S:-3}
KERNEL_DEADLINE_S=${BOOTCACHE_DETECT_KERNEL_DEADLINE_S:-5}
PROGRESS_WINDOW_MS=1500
QEMU=${QEMU:-qemu-system-x86_64}

kernel=""
verbose=0
probe_accel=kvm
while [[ $# -gt 0 ]]; do
  case "$1" in
    --kernel) kernel=${2:?--kernel needs a path}; shift 2 ;;
    --probe-accel) probe_accel=${2:?--probe-accel needs a value}; shift 2 ;;
    --verbose|-v) verbose=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "detect-accel: unknown argument: $1" >&2; exit 2 ;;
  esac
done

answer() { # answer ACCEL REASON
  echo "$1"
  echo "detect-accel: $1: $2" >&2
  exit 0
}
# run_probe runs with stderr on /dev/null (bash reports "Killed" for the probe
# QEMU otherwise), so debug output goes to fd 3, a copy of the real stderr.
exec 3>&2
debug() { if [[ $verbose == 1 ]]; then echo "detect-accel: $*" >&3; fi; }

case "${BOOTCACHE_ACCEL:-}" in
  kvm|tcg) answer "$BOOTCACHE_ACCEL" "forced by BOOTCACHE_ACCEL" ;;
  "") ;;
  *) echo "detect-accel: BOOTCACHE_ACCEL must be kvm or tcg, not '$BOOTCACHE_ACCEL'" >&2; exit 2 ;;
esac

if ! command -v "$QEMU" >/dev/null 2>&1; then
  answer tcg "$QEMU not found (install qemu-system-x86)"
fi
if [[ $probe_accel == kvm ]]; then
  [[ -e /dev/kvm ]] || answer tcg "/dev/kvm does not exist"
  # Opening read-write is what QEMU does; a plain -w test ignores ACLs/cgroups.
  if ! { exec {kvm_fd}<>/dev/kvm; } 2>/dev/null; then
    answer tcg "/dev/kvm cannot be opened read-write"
  fi
  exec {kvm_fd}>&-
fi

if [[ -z $kernel ]]; then
  for k in "${BOOTCACHE_REF_DIR:-/var/cache/bootcache/reference-guest}/vmlinuz" /boot/vmlinuz /vmlinuz; do
    if [[ -r $k ]]; then kernel=$k; break; fi
  done
elif [[ ! -r $kernel ]]; then
  echo "detect-accel: kernel not readable: $kernel" >&2; exit 2
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/detect-accel.XXXXXX")
qemu_pid=""
cleanup() {
  if [[ -n $qemu_pid ]]; then kill -KILL "$qemu_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# run_probe DEADLINE_S PATTERN FILE QEMU-ARGS...: starts QEMU in the background
# and polls every 50 ms until FILE (a console QEMU writes) contains PATTERN.
# Returns 0 when it does in time; otherwise 1, with the reason in $probe_failure
# and in $probe_quiet_ms how long FILE had not grown (-1: it stayed empty).
# QEMU exiting is not success in itself: with -no-reboot a guest triple fault
# also ends QEMU with status 0. Never waits on a stuck QEMU: a process in
# uninterruptible sleep inside KVM may not die at once, so after SIGKILL we
# wait at most 1 s and then leave it behind.
probe_failure=""
probe_quiet_ms=-1
# Sets NOW_MS (wall clock) without forking a subshell; needs bash >= 5.
now_ms() { local t=${EPOCHREALTIME/./}; NOW_MS=$((10#$t / 1000)); }
run_probe() {
  local deadline_s=$1 pattern=$2 file=$3; shift 3
  local extra=() status found=0 exited="" start deadline kill_deadline size last_size=0
  probe_quiet_ms=-1
  read -r -a extra <<<"${BOOTCACHE_DETECT_QEMU_EXTRA:-}"
  # Deadlines are wall-clock (a loaded host makes each poll slower).
  now_ms; start=$NOW_MS
  deadline=$((start + deadline_s * 1000))
  "$QEMU" "$@" "${extra[@]}" </dev/null >"$tmp/qemu.out" 2>&1 &
  qemu_pid=$!
  local last_growth=$start
  while now_ms && ((NOW_MS < deadline)); do
    if grep -qs "$pattern" "$file"; then found=1; break; fi
    size=$(stat -c %s "$file" 2>/dev/null || echo 0)
    if ((size > last_size)); then last_size=$size; last_growth=$NOW_MS; fi
    if ! kill -0 "$qemu_pid" 2>/dev/null; then
      status=0; wait "$qemu_pid" || status=$?
      qemu_pid=""
      grep -qs "$pattern" "$file" && found=1
      now_ms; exited="QEMU exited (status $status) after $((NOW_MS - start)) ms"
      break
    fi
    sleep 0.05
  done
  # One last look: the pattern may have come during the last sleep.
  [[ $found == 1 ]] || ! grep -qs "$pattern" "$file" || found=1
  now_ms; local elapsed=$((NOW_MS - start))
  if ((last_size > 0)); then probe_quiet_ms=$((NOW_MS - last_growth)); fi
  if [[ -n $qemu_pid ]]; then
    kill -KILL "$qemu_pid" 2>/dev/null || true
    now_ms; kill_deadline=$((NOW_MS + 1000))
    while now_ms && ((NOW_MS < kill_deadline)); do
      kill -0 "$qemu_pid" 2>/dev/null || break
      sleep 0.05
    done
    if kill -0 "$qemu_pid" 2>/dev/null; then
      disown "$qemu_pid" 2>/dev/null || true
    else
      wait "$qemu_pid" 2>/dev/null || true
    fi
    qemu_pid=""
  fi
  if [[ $found == 1 ]]; then
    debug "'$pattern' seen after about $elapsed ms"
    return 0
  fi
  if [[ -n $exited ]]; then
    probe_failure="$exited without '$pattern'$(head -n1 "$tmp/qemu.out" | cut -c1-160 | sed 's/^./: &/')"
  else
    probe_failure="no '$pattern' within ${deadline_s}s"
  fi
  return 1
}

common=(-accel "$probe_accel" -nodefaults -display none -monitor none -no-reboot -m 256 -smp 2)

if ! run_probe "$FIRMWARE_DEADLINE_S" SeaBIOS "$tmp/debugcon" "${common[@]}" \
  -debugcon "file:$tmp/debugcon" -global isa-debugcon.iobase=0x402 2>/dev/null; then
  answer tcg "-accel $probe_accel firmware check failed: $probe_failure"
fi

if [[ -z $kernel ]]; then
  answer "$probe_accel" "firmware runs under -accel $probe_accel (no kernel found for the kernel check)"
fi

# earlycon: console output from the kernel's first steps, not only once the
# 8250 driver is up, so "no output" really means "not running".
if ! run_probe "$KERNEL_DEADLINE_S" "Kernel panic" "$tmp/serial" "${common[@]}" -serial "file:$tmp/serial" \
  -kernel "$kernel" -append "earlycon=uart8250,io,0x3f8,115200 console=ttyS0 panic=-1 root=/dev/bootcache-no-root" 2>/dev/null; then
  last=$(tr -d '\r' <"$tmp/serial" 2>/dev/null | grep -v '^[[:space:]]*$' | tail -n1 | cut -c1-120 || true)
  # A slow (loaded) host may not reach the panic in time; a kernel still
  # printing in the last PROGRESS_WINDOW_MS counts as running, a silent one
  # as hung.
  if ((probe_quiet_ms >= 0 && probe_quiet_ms <= PROGRESS_WINDOW_MS)); then
    answer "$probe_accel" "kernel $(basename "$kernel") still booting under -accel $probe_accel after ${KERNEL_DEADLINE_S}s but making progress (last console line: ${last:-none})"
  fi
  answer tcg "-accel $probe_accel kernel check failed: $probe_failure, $( ((probe_quiet_ms < 0)) && echo "console silent" || echo "console quiet for ${probe_quiet_ms}ms") (last console line: ${last:-none})"
fi
answer "$probe_accel" "firmware and kernel $(basename "$kernel") run under -accel $probe_accel"
