# shellcheck shell=bash
# Shared helpers for scripts/reference-guest/*.sh (sourced, not run).
# Needs bash >= 5 for EPOCHREALTIME.
# shellcheck disable=SC2034 # the constants are used by the scripts sourcing this

RG_MARKER=BOOTCACHE-BOOT-COMPLETE
# agetty's prompt on ttyS0: "<hostname> login: " (no newline after it).
RG_LOGIN_PATTERN=' login: '

# Microseconds since the epoch, without forking.
rg_now_us() { local t=${EPOCHREALTIME/./}; echo "$((10#$t))"; }

# rg_seconds_since START_US: elapsed seconds with two decimals.
rg_seconds_since() {
  local d=$(($(rg_now_us) - $1))
  printf '%d.%02d' $((d / 1000000)) $((d % 1000000 / 10000))
}

# rg_wait_for PID FILE ERE DEADLINE_US: polls FILE every 50 ms until it matches
# ERE. Returns 0 on a match, 1 when process PID has exited without one, 2 when
# the deadline (from rg_now_us) passes first.
rg_wait_for() {
  local pid=$1 file=$2 ere=$3 deadline=$4
  while :; do
    # No pipe here: under pipefail, grep -q exiting early would fail it.
    if grep -Eqs -- "$ere" "$file"; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      grep -Eqs -- "$ere" "$file" && return 0
      return 1
    fi
    if (($(rg_now_us) > deadline)); then return 2; fi
    sleep 0.05
  done
}

# rg_stop PID: SIGTERM, up to 3 s grace, then SIGKILL; reaps the child if it
# is ours. Never blocks for long.
rg_stop() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 60; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.05
    done
  fi
  if kill -0 "$pid" 2>/dev/null; then
    disown "$pid" 2>/dev/null || true
  else
    wait "$pid" 2>/dev/null || true
  fi
}

# rg_tail FILE [N]: last N (default 15) non-empty lines of a serial log, CRs dropped.
rg_tail() {
  tr -d '\r' <"$1" 2>/dev/null | grep -v '^[[:space:]]*$' | tail -n "${2:-15}" || true
}

# rg_image_format IMAGE: raw or qcow2, from the image header (as QEMU probes it).
rg_image_format() {
  local magic
  magic=$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')
  if [[ $magic == 514649fb ]]; then echo qcow2; else echo raw; fi
}

# rg_cpu_seconds PID: user+system CPU seconds the process has used so far
# (proc(5): fields 14 and 15 of /proc/PID/stat, in clock ticks).
rg_cpu_seconds() {
  local stat fields ticks hz
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo null; return; }
  read -r -a fields <<<"${stat##*) }" # fields after "(comm) ": [0] is field 3
  ticks=$((fields[11] + fields[12]))
  hz=$(getconf CLK_TCK)
  printf '%d.%02d' $((ticks / hz)) $((ticks % hz * 100 / hz))
}
