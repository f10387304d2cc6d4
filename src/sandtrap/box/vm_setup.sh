#!/bin/sh
# Makes the box's root file system a virtual machine's, inside a throw-away build container with network.
# Usage: vm_setup.sh STAGE_DIR HOSTNAME
#   STAGE_DIR holds this script, rootfs_setup.sh and the compiled init and session helper (rootfs_setup.sh removes it).
# 1. Debian's kernel (linux-image-amd64, its initramfs made here) and udev: a VM has devices to manage; QEMU's
#    guest agent, as cloud images carry it: the honeypot's own commands go by it, never by a login.
# 2. rootfs_setup.sh, as for a container box: users, history, logs, lures.
# 3. Undo what only a container box needs: the guest's PID 1 is systemd, its sshd Debian's own.
set -eu

STAGE=$1
HOST=$2
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
say() { echo "vm-setup: $*"; }

# The NIC keeps the kernel's name, eth0 (as on a cloud image), in the initramfs and after: udev's default
# naming policy masked. Before the kernel's install, so its initramfs holds the mask too.
mkdir -p /etc/systemd/network
ln -sf /dev/null /etc/systemd/network/99-default.link

say "apt-get update"
apt-get update -q
say "installing linux-image-amd64, udev and qemu-guest-agent"
apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold \
    linux-image-amd64 udev qemu-guest-agent
# The agent logs every command it is sent (guest-exec, guest-exec-status: "info: ... called") to the journal,
# what admins quieten with this drop-in (as `systemctl edit` names it): notices and worse still show.
mkdir -p /etc/systemd/system/qemu-guest-agent.service.d
printf '[Service]\nLogLevelMax=notice\n' > /etc/systemd/system/qemu-guest-agent.service.d/override.conf
chmod 0644 /etc/systemd/system/qemu-guest-agent.service.d/override.conf

# rootfs_setup.sh makes ssh.service start the container box's listener: keep Debian's unit to put back.
KEEP=$(mktemp -d)
cp -p /lib/systemd/system/ssh.service "$KEEP/ssh.service"
sh "$STAGE/setup.sh" "$STAGE" "$HOST"

say "systemd as PID 1, Debian's sshd"
cp -p "$KEEP/ssh.service" /lib/systemd/system/ssh.service
rm -rf "$KEEP"
ln -sf /lib/systemd/systemd /sbin/init
# The attacker's SSH is relayed into this sshd (sandbox/microvm/relay.py): sshd itself does utmp, motd, the
# login shell and the auth log, so sandtrap's container session helper (session.c) goes. Bookworm's OpenSSH
# (9.2) has no sshd-session of its own.
rm -f /usr/lib/openssh/sshd-session
# Logins come as the attacker made them, root's password ones too: a server that lets root in by password
# (what attackers look for). Debian's default is prohibit-password; the drop-in is how an admin would say it.
mkdir -p /etc/ssh/sshd_config.d
printf 'PermitRootLogin yes\n' > /etc/ssh/sshd_config.d/10-root-login.conf
chmod 0644 /etc/ssh/sshd_config.d/10-root-login.conf
# A VM's kernel has audit: pam_loginuid as Debian ships it.
for svc in cron sshd; do
    if [ -f "/etc/pam.d/$svc" ]; then
        sed -i 's/^session\s\+optional\s\+pam_loginuid\.so/session    required     pam_loginuid.so/' "/etc/pam.d/$svc"
    fi
done
mkdir -p /etc/systemd/system/multi-user.target.wants
ln -sf /lib/systemd/system/ssh.service /etc/systemd/system/multi-user.target.wants/ssh.service
say "tidy"
apt-get clean
rm -rf /var/lib/apt/lists/*_* /var/cache/apt/*.bin /var/log/apt/eipp.log.xz
say "done"
