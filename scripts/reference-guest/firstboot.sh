#!/bin/sh
# PID 1 of the reference guest's one install boot. build.sh copies this into
# the rootfs as /usr/local/sbin/bootcache-grub-firstboot and boots the disk
# with QEMU direct kernel boot and init=<that path>; it installs GRUB for BIOS
# boot on /dev/vda from inside the guest, reports on the serial console and
# powers off. build.sh deletes it from the image afterwards.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive

say() { echo "bootcache-firstboot: $*"; }

# initramfs-tools moves /dev, /proc, /sys and /run onto the real root; mount
# whatever is still missing (e.g. when booted without an initramfs).
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mountpoint -q /run || mount -t tmpfs tmpfs /run
mount -o remount,rw / || say "remount rw failed"

status=OK
# grub-mkconfig writes root=UUID=... only if /dev/disk/by-uuid/<uuid> exists;
# the initramfs's udev normally made it, but do not depend on that.
uuid=$(blkid -s UUID -o value /dev/vda1 || true)
if [ -n "$uuid" ] && [ ! -e "/dev/disk/by-uuid/$uuid" ]; then
  mkdir -p /dev/disk/by-uuid && ln -s ../../vda1 "/dev/disk/by-uuid/$uuid"
fi

say "grub-install --target=i386-pc /dev/vda"
grub-install --target=i386-pc /dev/vda || status=FAILED
say "update-grub"
update-grub || status=FAILED
# So that grub-pc upgrades inside the guest reinstall to the same disk.
echo "grub-pc grub-pc/install_devices multiselect /dev/vda" | debconf-set-selections || status=FAILED

sync
mount -o remount,ro / || say "remount ro failed"
sync
echo "BOOTCACHE-GRUB-INSTALL-$status"
# Power off at once; the root fs is read-only and synced. Writing to
# /proc/sysrq-trigger works whatever kernel.sysrq says.
echo o >/proc/sysrq-trigger
sleep 30
echo b >/proc/sysrq-trigger
