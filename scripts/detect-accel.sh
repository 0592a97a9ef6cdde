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
#     ttyS0 (then resets; -no-reboot makes QEMU exit). No "Kernel panic" on
#     the serial console within 6 s -> tcg. QEMU exiting alone is no proof:
#     a triple fault also ends it.
#
# Usage: detect-accel.sh [--kernel VMLINUZ] [--verbose]
# Env:   BOOTCACHE_ACCEL=kvm|tcg   skip the probe and use this answer
#        BOOTCACHE_REF_DIR         where build.sh put the reference guest
# Test hooks (not for normal use): --probe-accel ACCEL probes with another
#        accelerator (e.g. tcg, to exercise the "works" path on a host without
#        KVM); BOOTCACHE_DETECT_QEMU_EXTRA adds QEMU arguments (e.g. -S freezes
#        the guest, to exercise the "hangs" path).
set -euo pipefail

FIRMWARE_DEADLINE_S=3
KERNEL_DEADLINE_S=6
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
# Returns 0 when it does in time; otherwise 1, with the reason in $probe_failure.
# QEMU exiting is not success in itself: with -no-reboot a guest triple fault
# also ends QEMU with status 0. Never waits on a stuck QEMU: a process in
# uninterruptible sleep inside KVM may not die at once, so after SIGKILL we
# wait at most 1 s and then leave it behind.
probe_failure=""
run_probe() {
  local deadline_s=$1 pattern=$2 file=$3; shift 3
  local extra=() ticks=$((deadline_s * 20)) i j status found=0 exited=""
  read -r -a extra <<<"${BOOTCACHE_DETECT_QEMU_EXTRA:-}"
  "$QEMU" "$@" "${extra[@]}" </dev/null >"$tmp/qemu.out" 2>&1 &
  qemu_pid=$!
  for ((i = 0; i < ticks; i++)); do
    if grep -qs "$pattern" "$file"; then found=1; break; fi
    if ! kill -0 "$qemu_pid" 2>/dev/null; then
      status=0; wait "$qemu_pid" || status=$?
      qemu_pid=""
      grep -qs "$pattern" "$file" && found=1
      exited="QEMU exited (status $status) after $((i * 50)) ms"
      break
    fi
    sleep 0.05
  done
  if [[ -n $qemu_pid ]]; then
    kill -KILL "$qemu_pid" 2>/dev/null || true
    for ((j = 0; j < 20; j++)); do
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
    debug "'$pattern' seen after about $((i * 50)) ms"
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

if ! run_probe "$KERNEL_DEADLINE_S" "Kernel panic" "$tmp/serial" "${common[@]}" -serial "file:$tmp/serial" \
  -kernel "$kernel" -append "console=ttyS0 panic=-1 root=/dev/bootcache-no-root" 2>/dev/null; then
  last=$(tr -d '\r' <"$tmp/serial" 2>/dev/null | grep -v '^[[:space:]]*$' | tail -n1 | cut -c1-120 || true)
  answer tcg "-accel $probe_accel kernel check failed: $probe_failure (last console line: ${last:-none})"
fi
answer "$probe_accel" "firmware and kernel $(basename "$kernel") run under -accel $probe_accel"
