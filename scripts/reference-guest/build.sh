#!/usr/bin/env bash
# Build the bootcache reference guest: a small, real, BIOS/GRUB-bootable
# Debian 12 disk that prints BOOTCACHE-BOOT-COMPLETE on ttyS0 once
# multi-user.target is reached. Used by end-to-end tests and benchmarks of
# `bootcache profile` and of boot times. See docs/reference-guest.md.
#
# Usage: scripts/reference-guest/build.sh [--out DIR] [--extra-packages LIST] [--force]
#   --out DIR   output directory (default: $BOOTCACHE_REF_DIR, else
#               /var/cache/bootcache/reference-guest)
#   --extra-packages LIST
#               comma-separated Debian packages installed on top of the
#               default PACKAGES (a sibling guest, e.g. nginx,redis-server);
#               part of the recipe, so give such a guest its own --out DIR.
#               Without it the build is the default one, unchanged.
#   --force     rebuild even if the output is up to date
# Env: BOOTCACHE_REF_DIR (output dir), BOOTCACHE_EXTRA_PACKAGES (the same as
#      --extra-packages; the option wins), BOOTCACHE_DEBIAN_MIRROR (override the
#      mirror found in apt's sources), BOOTCACHE_ACCEL=kvm|tcg (skip
#      detection), BOOTCACHE_NO_APT=1 (never apt-get install missing tools),
#      BOOTCACHE_KEEP_WORK=1 (keep the temp dir of a failed build).
#
# Outputs in DIR: debian12.raw (2 GiB, MBR, one ext4 partition at 1 MiB),
# debian12.qcow2, debian12-compressed.qcow2, vmlinuz and initrd.img (the
# guest's, for direct kernel boots), manifest.json, build.log.
# Idempotent: when DIR/manifest.json was made by the same recipe (these
# scripts and the mirror) and the files are all there, it returns at once.
# Needs root (debootstrap, loop devices, mount). Runs unattended.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

SUITE=bookworm
IMAGE_BYTES=$((2 * 1024 * 1024 * 1024))
PART_START_BYTES=$((1024 * 1024))
GUEST_HOSTNAME=bootcache-ref
PACKAGES=systemd-sysv,udev,linux-image-amd64,grub-pc,initramfs-tools,dbus,cron,rsyslog,openssh-server,iproute2,procps
# Files whose content defines the image; a change in any of them rebuilds it.
RECIPE_FILES=("$HERE/build.sh" "$HERE/lib.sh" "$HERE/firstboot.sh")
FIRSTBOOT_TIMEOUT_S=900
VERIFY_TIMEOUT_S=300
OUTPUT_FILES=(debian12.raw debian12.qcow2 debian12-compressed.qcow2 vmlinuz initrd.img)

die() { echo "build.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

out=""
force=0
extra=${BOOTCACHE_EXTRA_PACKAGES:-}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    --extra-packages) extra=${2?--extra-packages needs a list}; shift 2 ;;
    --extra-packages=*) extra=${1#--extra-packages=}; shift ;;
    --force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
# Comma-separated package names only (they go into debootstrap's --include).
extra=${extra//[[:space:]]/}
extra=${extra#,}
extra=${extra%,}
[[ -z $extra || $extra =~ ^[a-z0-9][a-z0-9.+-]*(,[a-z0-9][a-z0-9.+-]*)*$ ]] \
  || die "--extra-packages: not a comma-separated list of Debian package names: $extra"
[[ -z $extra ]] || PACKAGES="$PACKAGES,$extra"
OUT=${out:-${BOOTCACHE_REF_DIR:-/var/cache/bootcache/reference-guest}}
[[ $OUT == /* ]] || OUT="$PWD/$OUT"
OUT=${OUT%/}
[[ -n $OUT && $OUT != / ]] || die "refusing to use / as the output directory"
PARENT=$(dirname "$OUT")
NAME=$(basename "$OUT")
LOG="$PARENT/$NAME.build.log"

# The Debian mirror apt uses: the first "deb" source whose suites include
# bookworm itself (not -security/-updates), deb822 (*.sources) or one-line format.
find_mirror() {
  if [[ -n ${BOOTCACHE_DEBIAN_MIRROR:-} ]]; then echo "${BOOTCACHE_DEBIAN_MIRROR%/}"; return; fi
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -r $f ]] || continue
    # deb822 stanzas are separated by blank lines; print URIs of stanzas with
    # Types: deb and Suites: ... bookworm ...
    uri=$(awk -v suite="$SUITE" '
      function flush() { if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "") { split(uris, u, " "); print u[1]; found = 1; exit } types = suites = uris = "" }
      /^[[:space:]]*$/ { flush(); next }
      /^[[:space:]]*#/ { next }
      tolower($1) == "types:" { $1 = ""; types = $0 }
      tolower($1) == "suites:" { $1 = ""; suites = $0 }
      tolower($1) == "uris:" { $1 = ""; uris = $0 }
      END { if (!found) flush() }' "$f" | head -n1)
    if [[ -n $uri ]]; then echo "${uri%/}"; return; fi
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -r $f ]] || continue
    # deb [options] URI SUITE COMPONENTS...
    uri=$(sed -E 's/\[[^]]*\]//' "$f" | awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }')
    if [[ -n $uri ]]; then echo "${uri%/}"; return; fi
  done
  echo "http://deb.debian.org/debian"
}

MIRROR=$(find_mirror)
# The extra packages are part of the recipe; the default build hashes what it always did.
RECIPE=$( { cat "${RECIPE_FILES[@]}"; echo "mirror=$MIRROR"; [[ -z $extra ]] || echo "extra=$extra"; } | sha256sum | cut -c1-64)

# manifest_value FILE KEY: a top-level string or number from our own manifest
# format (one key per line); the manifest is written by write_manifest below.
manifest_value() { sed -nE "s/^  \"$2\": \"?([^\",]*)\"?,?\$/\\1/p" "$1" | head -n1; }
# manifest_file_bytes FILE NAME: recorded size of an output file.
manifest_file_bytes() { sed -nE "s/^    \"$2\": \\{ \"bytes\": ([0-9]+),.*/\\1/p" "$1" | head -n1; }

up_to_date() {
  local m="$OUT/manifest.json" f want have
  [[ -f $m ]] || return 1
  [[ $(manifest_value "$m" recipe) == "$RECIPE" ]] || return 1
  for f in "${OUTPUT_FILES[@]}"; do
    want=$(manifest_file_bytes "$m" "$f")
    [[ -n $want && -f $OUT/$f ]] || return 1
    have=$(stat -c %s "$OUT/$f")
    [[ $have == "$want" ]] || return 1
  done
}

if [[ $force == 0 ]] && up_to_date; then
  echo "reference guest is up to date in $OUT (recipe ${RECIPE:0:12}; --force rebuilds)"
  exit 0
fi

[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, loop devices and mounts need it)"
mkdir -p "$PARENT" || die "cannot create $PARENT"

# One build at a time per output directory; a second caller waits, then
# usually finds the first one's result up to date.
exec {lock_fd}>"$PARENT/.$NAME.lock"
if ! flock -n "$lock_fd"; then
  echo "build.sh: another build of $OUT is running; waiting for it" >&2
  flock -w 3600 "$lock_fd" || die "timed out waiting for the other build's lock"
  if [[ $force == 0 ]] && up_to_date; then
    echo "reference guest is up to date in $OUT (built by the other run)"
    exit 0
  fi
fi

: >"$LOG" || die "cannot write the log $LOG"
BUILD_START=$(rg_now_us)
step() {
  local msg
  msg="[$(date -u +%H:%M:%S)] $*"
  echo "$msg" >&2
  echo "=== $msg" >>"$LOG"
}
# run CMD...: runs a command with its output in the log only.
run() {
  echo "+ $*" >>"$LOG"
  "$@" >>"$LOG" 2>&1
}
# run_ts CMD...: the same, each output line prefixed with the time of day
# (for the long steps, to see where the time goes).
run_ts() {
  echo "+ $*" >>"$LOG"
  "$@" 2>&1 | while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done >>"$LOG"
}

WORK="" MNT="" LOOP="" QEMU_PID=""
cleanup() {
  local rc=$?
  set +e
  if [[ -n $QEMU_PID ]]; then rg_stop "$QEMU_PID"; fi
  if [[ -n $MNT ]] && mountpoint -q "$MNT"; then
    umount -R "$MNT" >>"$LOG" 2>&1 || umount -R -l "$MNT" >>"$LOG" 2>&1
  fi
  if [[ -n $LOOP ]]; then losetup -d "$LOOP" >>"$LOG" 2>&1; fi
  if [[ $rc != 0 ]]; then
    {
      echo "build.sh: build FAILED (exit $rc); full log: $LOG"
      echo "build.sh: last lines of the log:"
      tail -n 25 "$LOG" | sed 's/^/  | /'
    } >&2
    if [[ -n $WORK && ${BOOTCACHE_KEEP_WORK:-0} == 1 ]]; then
      echo "build.sh: work directory kept: $WORK" >&2
      WORK=""
    fi
  fi
  if [[ -n $WORK ]]; then rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ensure_tools() {
  local -A pkg_of=(
    [debootstrap]=debootstrap [sfdisk]=fdisk [mkfs.ext4]=e2fsprogs [blkid]=util-linux
    [losetup]=mount [qemu-system-x86_64]=qemu-system-x86 [qemu-img]=qemu-utils
    [flock]=util-linux [sha256sum]=coreutils [od]=coreutils
  )
  local missing=() c
  for c in "${!pkg_of[@]}"; do
    command -v "$c" >/dev/null 2>&1 || missing+=("${pkg_of[$c]}")
  done
  [[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
  [[ ${#missing[@]} == 0 ]] && return
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  [[ ${BOOTCACHE_NO_APT:-0} == 1 ]] && die "missing packages: ${missing[*]} (BOOTCACHE_NO_APT=1 forbids installing them)"
  step "installing host tools: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! run apt-get install -y --no-install-recommends "${missing[@]}"; then
    run apt-get update || die "apt-get update failed (see $LOG)"
    run apt-get install -y --no-install-recommends "${missing[@]}" || die "cannot install ${missing[*]} (see $LOG)"
  fi
}

step "building the reference guest into $OUT (log: $LOG)"
echo "recipe=$RECIPE mirror=$MIRROR suite=$SUITE" >>"$LOG"
ensure_tools
ACCEL=$("$HERE/../detect-accel.sh" 2>>"$LOG")
step "accelerator: $ACCEL ($(tail -n1 "$LOG"))"

WORK=$(mktemp -d "$PARENT/.$NAME.build.XXXXXX")
MNT="$WORK/rootfs"
STAGE="$WORK/out"
RAW="$STAGE/debian12.raw"
mkdir -p "$MNT" "$STAGE"

step "partitioning a ${IMAGE_BYTES}-byte raw disk (MBR, one ext4 partition at 1 MiB)"
truncate -s "$IMAGE_BYTES" "$RAW"
printf 'label: dos\nstart=%d, type=83, bootable\n' $((PART_START_BYTES / 512)) | run sfdisk --no-reread --no-tell-kernel "$RAW" \
  || die "sfdisk failed"
part_line=$(sfdisk -d "$RAW" | grep -E '^[^:]+1 :') || die "no partition 1 in the new table"
part_start=$(sed -E 's/.*start= *([0-9]+).*/\1/' <<<"$part_line")
part_sectors=$(sed -E 's/.*size= *([0-9]+).*/\1/' <<<"$part_line")
[[ $((part_start * 512)) == "$PART_START_BYTES" ]] || die "partition starts at sector $part_start, expected $((PART_START_BYTES / 512))"
PART_BYTES=$((part_sectors * 512))

LOOP=$(losetup --find --show --offset "$PART_START_BYTES" --sizelimit "$PART_BYTES" "$RAW") \
  || die "losetup failed: are loop devices available (modprobe loop; /dev/loop-control)?"
# Inode tables and journal initialised now, not lazily by the guest kernel on
# every (snapshot) boot, which would add writes to each measured boot.
run mkfs.ext4 -q -L bootcache-root -E lazy_itable_init=0,lazy_journal_init=0 "$LOOP" || die "mkfs.ext4 failed"
FS_UUID=$(blkid -s UUID -o value "$LOOP")
[[ -n $FS_UUID ]] || die "cannot read the new filesystem's UUID"
# No write barriers while building: nothing needs to survive a host crash
# mid-build, and each barrier is a flush of the image file on the host.
run mount -o barrier=0 "$LOOP" "$MNT" || die "cannot mount $LOOP"

# Written before debootstrap, which keeps an existing /etc/fstab. FSTYPE
# tells initramfs-tools the root fs type (it cannot probe the guest's root
# device from the build chroot), so the initramfs gets fsck.ext4 as on a
# normal install.
mkdir -p "$MNT/etc/dpkg/dpkg.cfg.d" "$MNT/etc/initramfs-tools/conf.d"
cat >"$MNT/etc/fstab" <<EOF
# bootcache reference guest
UUID=$FS_UUID	/	ext4	errors=remount-ro	0	1
EOF
echo "FSTYPE=ext4" >"$MNT/etc/initramfs-tools/conf.d/bootcache-root-fstype"
# dpkg without an fsync per unpacked file; removed again after debootstrap.
echo force-unsafe-io >"$MNT/etc/dpkg/dpkg.cfg.d/bootcache-build-unsafe-io"

step "debootstrap --variant=minbase $SUITE from $MIRROR (this takes a few minutes)"
export DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 LC_ALL=C.UTF-8
# .debs are kept between builds (debootstrap re-checks their checksums), so a
# rebuild downloads only what changed; ones older than 90 days are dropped
# (debootstrap does not touch a cached file it reuses, so mtime = download).
DEB_CACHE="$PARENT/debootstrap-cache"
mkdir -p "$DEB_CACHE"
find "$DEB_CACHE" -name '*.deb' -mtime +90 -delete
# INITRD=No: the kernel package makes no initramfs (initramfs-tools' trigger
# would make it a second time); it is made once below. Each build of it takes
# minutes on a busy 2-core host.
INITRD=No run_ts debootstrap --variant=minbase --arch=amd64 --components=main \
  --keyring=/usr/share/keyrings/debian-archive-keyring.gpg --cache-dir="$DEB_CACHE" \
  --include="$PACKAGES" "$SUITE" "$MNT" "$MIRROR" \
  || die "debootstrap failed (see $LOG; is $MIRROR reachable?)"
# debootstrap unmounts what it mounted, but be sure nothing is left below $MNT.
leftover=$(findmnt -R -n -o TARGET "$MNT" | tail -n +2 | sort -r)
if [[ -n $leftover ]]; then
  echo "unmounting what debootstrap left: $leftover" >>"$LOG"
  xargs -r -n1 umount -l <<<"$leftover"
fi

rm -f "$MNT/etc/dpkg/dpkg.cfg.d/bootcache-build-unsafe-io"
grep -q "UUID=$FS_UUID" "$MNT/etc/fstab" || die "debootstrap replaced /etc/fstab"

step "configuring the guest"
KERNEL_VERSION=$(basename "$(ls -1 "$MNT"/boot/vmlinuz-* | sort -V | tail -n1)")
KERNEL_VERSION=${KERNEL_VERSION#vmlinuz-}
[[ -n $KERNEL_VERSION ]] || die "no kernel in the rootfs /boot"
if [[ ! -f $MNT/boot/initrd.img-$KERNEL_VERSION ]]; then
  step "making the initramfs for $KERNEL_VERSION"
  for d in dev proc sys; do run mount --bind "/$d" "$MNT/$d"; done
  run chroot "$MNT" update-initramfs -c -k "$KERNEL_VERSION" || die "update-initramfs failed"
  for d in sys proc dev; do run umount "$MNT/$d"; done
fi
[[ -f $MNT/boot/initrd.img-$KERNEL_VERSION ]] || die "no initrd for $KERNEL_VERSION in the rootfs /boot"

echo "$GUEST_HOSTNAME" >"$MNT/etc/hostname"
cat >"$MNT/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$GUEST_HOSTNAME
::1		localhost ip6-localhost ip6-loopback
EOF
# QEMU user-mode networking's DNS; do not ship the build host's resolv.conf.
echo "nameserver 10.0.2.3" >"$MNT/etc/resolv.conf"
# Test guest: no usable root password (locked); log in by other means.
run chroot "$MNT" usermod -p '*' root
run chroot "$MNT" passwd -l root

cat >"$MNT/etc/default/grub" <<'EOF'
# bootcache reference guest (scripts/reference-guest/build.sh)
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_TIMEOUT_STYLE=menu
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=ttyS0,115200n8"
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
EOF

wants() { # wants TARGET UNIT [TEMPLATE]: enable UNIT the way systemctl enable would
  mkdir -p "$MNT/etc/systemd/system/$1.wants"
  ln -sf "${3:-/lib/systemd/system/$2}" "$MNT/etc/systemd/system/$1.wants/$2"
}
# A login prompt on the serial port even without console=ttyS0.
wants getty.target serial-getty@ttyS0.service /lib/systemd/system/serial-getty@.service

cat >"$MNT/etc/systemd/system/bootcache-boot-complete.service" <<EOF
[Unit]
Description=Print the bootcache boot-complete marker on ttyS0
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo $RG_MARKER >/dev/ttyS0'

[Install]
WantedBy=multi-user.target
EOF
wants multi-user.target bootcache-boot-complete.service /etc/systemd/system/bootcache-boot-complete.service

# DHCP on the first NIC with systemd-networkd (no wait-online: nothing in the
# boot path waits for the network).
cat >"$MNT/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
wants multi-user.target systemd-networkd.service
wants sockets.target systemd-networkd.socket

install -m 0755 "$HERE/firstboot.sh" "$MNT/usr/local/sbin/bootcache-grub-firstboot"

# (grep without -q: under pipefail an early exit would fail the pipe)
chroot "$MNT" lsinitramfs "/boot/initrd.img-$KERNEL_VERSION" 2>>"$LOG" | grep 'sbin/fsck.ext4$' >/dev/null \
  || die "the initramfs has no fsck.ext4"
run chroot "$MNT" apt-get clean
rm -rf "$MNT"/var/lib/apt/lists/* "$MNT"/var/cache/apt/*.bin
cp "$MNT/boot/vmlinuz-$KERNEL_VERSION" "$STAGE/vmlinuz"
cp "$MNT/boot/initrd.img-$KERNEL_VERSION" "$STAGE/initrd.img"
INSTALLED_BYTES=$(df -B1 --output=used "$MNT" | tail -n1 | tr -d ' ')
PACKAGE_COUNT=$(chroot "$MNT" dpkg-query -W -f='${db:Status-Abbrev}\n' | grep -c '^ii')
# Blocks freed above (downloaded .debs, apt lists) still hold data in the
# image file; discard them so the loop device punches holes and the images
# (and qcow2 conversions) carry only live data.
run fstrim -v "$MNT" || die "fstrim failed"
run umount "$MNT"
run losetup -d "$LOOP"
LOOP=""

# The first check may have had no kernel to boot (a fresh host has none in
# /boot), and firmware alone runs on hosts where a kernel hangs under KVM.
if [[ $ACCEL == kvm && -z ${BOOTCACHE_ACCEL:-} ]]; then
  ACCEL=$("$HERE/../detect-accel.sh" --kernel "$STAGE/vmlinuz" 2>>"$LOG")
  step "accelerator with the guest's kernel: $ACCEL ($(tail -n1 "$LOG"))"
fi

step "installing GRUB from inside the guest (QEMU direct kernel boot, -accel $ACCEL)"
serial="$WORK/firstboot.serial"
: >"$serial"
qemu-system-x86_64 -accel "$ACCEL" -m 1024 -smp 2 -nic none \
  -display none -monitor none -no-reboot -serial "file:$serial" \
  -drive "file=$RAW,format=raw,if=virtio" \
  -kernel "$STAGE/vmlinuz" -initrd "$STAGE/initrd.img" \
  -append "root=/dev/vda1 rw console=ttyS0 panic=-1 init=/usr/local/sbin/bootcache-grub-firstboot" \
  </dev/null >>"$LOG" 2>&1 &
QEMU_PID=$!
wait_rc=0
rg_wait_for "$QEMU_PID" "$serial" 'BOOTCACHE-GRUB-INSTALL-(OK|FAILED)' \
  $(($(rg_now_us) + FIRSTBOOT_TIMEOUT_S * 1000000)) || wait_rc=$?
if [[ $wait_rc == 0 ]]; then
  # The guest powers itself off right after the line; give it time to.
  for ((i = 0; i < 600; i++)); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.05; done
fi
rg_stop "$QEMU_PID"
QEMU_PID=""
{ echo "--- install boot serial console:"; tr -d '\r' <"$serial"; echo "--- end"; } >>"$LOG"
grep -q 'BOOTCACHE-GRUB-INSTALL-OK' "$serial" || {
  [[ $wait_rc == 2 ]] && die "the GRUB install boot did not finish in ${FIRSTBOOT_TIMEOUT_S}s; serial: $(rg_tail "$serial" 3 | tr '\n' '|')"
  die "GRUB install inside the guest failed; serial: $(rg_tail "$serial" 5 | tr '\n' '|')"
}

step "checking the installed boot loader"
grep -aq GRUB < <(head -c 512 "$RAW") || die "no GRUB boot code in the MBR"
LOOP=$(losetup --find --show --offset "$PART_START_BYTES" --sizelimit "$PART_BYTES" "$RAW") || die "losetup failed"
run e2fsck -fy "$LOOP" || die "e2fsck after the install boot reported errors"
run mount "$LOOP" "$MNT"
grep -q 'console=ttyS0' "$MNT/boot/grub/grub.cfg" || die "grub.cfg has no console=ttyS0"
grep -q "root=UUID=$FS_UUID" "$MNT/boot/grub/grub.cfg" || echo "warning: grub.cfg does not use root=UUID=$FS_UUID" >>"$LOG"
grep -q '^terminal_output serial' "$MNT/boot/grub/grub.cfg" || die "grub.cfg does not use the serial terminal"
rm -f "$MNT/usr/local/sbin/bootcache-grub-firstboot"
run fstrim -v "$MNT" || die "fstrim failed"
run umount "$MNT"
run losetup -d "$LOOP"
LOOP=""

step "verification boot of debian12.raw through BIOS and GRUB (-accel $ACCEL, snapshot)"
verify_json=$("$HERE/boot-time.sh" --accel "$ACCEL" --timeout "$VERIFY_TIMEOUT_S" --json "$RAW" 2>>"$LOG") \
  || die "the built image did not boot to $RG_MARKER and a login prompt: $(tail -n 4 "$LOG" | tr '\n' '|')"
echo "$verify_json" >>"$LOG"
VERIFY_MARKER_S=$(sed -nE 's/.*"markerSeconds":([0-9.]+).*/\1/p' <<<"$verify_json")
VERIFY_LOGIN_S=$(sed -nE 's/.*"loginSeconds":([0-9.]+).*/\1/p' <<<"$verify_json")
VERIFY_CPU_S=$(sed -nE 's/.*"qemuCpuSeconds":([0-9.]+).*/\1/p' <<<"$verify_json")
step "booted to the marker in ${VERIFY_MARKER_S}s (QEMU CPU ${VERIFY_CPU_S}s), login prompt at ${VERIFY_LOGIN_S}s"

step "converting to qcow2 and compressed qcow2"
run qemu-img convert -f raw -O qcow2 "$RAW" "$STAGE/debian12.qcow2" || die "qemu-img convert to qcow2 failed"
run qemu-img convert -c -f raw -O qcow2 "$RAW" "$STAGE/debian12-compressed.qcow2" || die "qemu-img convert -c failed"
run qemu-img check "$STAGE/debian12.qcow2" || die "qemu-img check failed on debian12.qcow2"
run qemu-img check "$STAGE/debian12-compressed.qcow2" || die "qemu-img check failed on debian12-compressed.qcow2"
run qemu-img compare -f raw -F qcow2 "$RAW" "$STAGE/debian12-compressed.qcow2" || die "compressed qcow2 differs from the raw image"

step "writing manifest.json"
file_entry() { # file_entry NAME LAST: one "files" line of the manifest
  local f="$STAGE/$1" sha
  sha=$(sha256sum "$f" | cut -c1-64)
  printf '    "%s": { "bytes": %d, "allocatedBytes": %d, "sha256": "%s" }%s\n' \
    "$1" "$(stat -c %s "$f")" $(($(stat -c %b "$f") * $(stat -c %B "$f"))) "$sha" "$2"
}
{
  echo "{"
  echo '  "name": "bootcache reference guest",'
  echo '  "distribution": "Debian 12 (bookworm), debootstrap --variant=minbase",'
  echo "  \"builtAt\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
  echo "  \"buildSeconds\": $(rg_seconds_since "$BUILD_START"),"
  echo "  \"recipe\": \"$RECIPE\","
  echo "  \"mirror\": \"$MIRROR\","
  echo "  \"kernelVersion\": \"$KERNEL_VERSION\","
  echo "  \"marker\": \"$RG_MARKER\","
  echo "  \"hostname\": \"$GUEST_HOSTNAME\","
  echo "  \"packages\": \"$PACKAGES\","
  [[ -z $extra ]] || echo "  \"extraPackages\": \"$extra\","
  echo "  \"installedPackages\": $PACKAGE_COUNT,"
  echo "  \"installedBytes\": $INSTALLED_BYTES,"
  echo "  \"rootPartition\": { \"startBytes\": $PART_START_BYTES, \"sizeBytes\": $PART_BYTES, \"fsUuid\": \"$FS_UUID\" },"
  echo "  \"verifyBoot\": { \"accel\": \"$ACCEL\", \"markerSeconds\": $VERIFY_MARKER_S, \"loginSeconds\": $VERIFY_LOGIN_S, \"qemuCpuSeconds\": ${VERIFY_CPU_S:-null} },"
  echo '  "files": {'
  last=$((${#OUTPUT_FILES[@]} - 1))
  for i in "${!OUTPUT_FILES[@]}"; do
    file_entry "${OUTPUT_FILES[$i]}" "$([[ $i == "$last" ]] || echo ,)"
  done
  echo '  }'
  echo "}"
} >"$STAGE/manifest.json"
if command -v node >/dev/null; then
  node -e 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))' "$STAGE/manifest.json" \
    || die "generated manifest.json is not valid JSON"
fi

step "moving the result into place"
cp "$LOG" "$STAGE/build.log"
old=""
if [[ -e $OUT ]]; then
  old="$WORK/previous"
  mv -T "$OUT" "$old"
fi
mv -T "$STAGE" "$OUT"
step "done in $(rg_seconds_since "$BUILD_START")s: $OUT"
ls -l "$OUT" >&2
