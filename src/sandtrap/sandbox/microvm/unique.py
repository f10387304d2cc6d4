"""Make a VM restored from the template its own machine before it is handed out.

Every restored VM starts as a byte-for-byte copy of the template's RAM: whatever the guest generated once is
a fingerprint shared by every box. One script (run as root by the guest agent, agent.py, values from
the host's CSPRNG) changes what can be changed from inside:

- the clock: stepped to the host's time (the template was saved minutes or days ago);
- entropy: 64 bytes of the host's ``os.urandom`` credited with ``RNDADDENTROPY``, then ``RNDRESEEDCRNG`` so
  the kernel's CRNG (and so every later ``getrandom``, ASLR, TCP sequence numbers of new sockets...) no longer
  follows the template's;
- ``/etc/machine-id``: the VM's own (the hex of its ``machine_uuid``);
- ``boot_id``: the kernel makes it once and never again, so a file with a fresh one is bind-mounted read-only
  over ``/proc/sys/kernel/random/boot_id`` (root can see the mount in ``/proc/self/mountinfo``: the price);
- the MAC of ``eth0`` (set through virtio-net's control queue, so QEMU's filter follows), announced by one
  gratuitous ARP (``arp_notify`` on just for the change) so the host side's neighbour entry follows; the
  address stays the configured one (every VM has its own namespace);
- the next PID: ``ns_last_pid`` moved by a random step, so the attacker's shell gets no PID shared by all.

What cannot be changed from inside (README "Micro-VMs"): the uptime (``CLOCK_BOOTTIME``) and every process's
start time and PID from before the save, the kernel's KASLR offset and per-boot secrets made before the
reseed, the SMBIOS product UUID (``/sys/class/dmi/id/product_uuid``: the template's), and journal entries
written before the save (the template's boot and machine ids).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import Sandbox, run

UNIQUE_TIMEOUT_S = 60.0
BOOT_ID_FILE = "/run/boot_id"

# $1 epoch seconds, $2 machine-id, $3 boot_id, $4 MAC, $5 last pid, $6 entropy (hex)
SCRIPT = r"""set -eu
date -u -s "@$1" >/dev/null
perl -e 'open(my $f, "+<", "/dev/urandom") or die "urandom: $!\n"; my $b = pack("H*", $ARGV[0]);
ioctl($f, 0x40085203, pack("ii", 8 * length($b), length($b)) . $b) or die "RNDADDENTROPY: $!\n";
ioctl($f, 0x5207, 0) or die "RNDRESEEDCRNG: $!\n";' "$6"
if mountpoint -q /etc/machine-id; then umount /etc/machine-id; fi
printf '%s\n' "$2" > /etc/machine-id
if mountpoint -q /proc/sys/kernel/random/boot_id; then umount /proc/sys/kernel/random/boot_id; fi
printf '%s\n' "$3" > BOOT_ID_FILE
chmod 444 BOOT_ID_FILE
mount --bind BOOT_ID_FILE /proc/sys/kernel/random/boot_id
mount -o remount,bind,ro /proc/sys/kernel/random/boot_id
echo 1 > /proc/sys/net/ipv4/conf/eth0/arp_notify
ip link set dev eth0 address "$4"
echo 0 > /proc/sys/net/ipv4/conf/eth0/arp_notify
ip neigh flush dev eth0
echo "$5" > /proc/sys/kernel/ns_last_pid
# The loggers started before the save: journald keeps the old machine-id's journal and rsyslog writes nothing
# after a restore; restarted, they log under this VM's own identity (auth.log, journalctl -u ssh).
systemctl restart systemd-journald rsyslog
""".replace("BOOT_ID_FILE", BOOT_ID_FILE)


@dataclass(frozen=True)
class Identity:
    machine_id: str
    boot_id: str
    mac: str
    last_pid: int
    entropy: bytes


def new_identity(machine_uuid: str, mac: str) -> Identity:
    boot = secrets.token_hex(16)
    return Identity(
        machine_id=machine_uuid.replace("-", ""),
        boot_id=f"{boot[:8]}-{boot[8:12]}-4{boot[13:16]}-{'89ab'[int(boot[16], 16) & 3]}{boot[17:20]}-{boot[20:]}",
        mac=mac,
        last_pid=2000 + secrets.randbelow(20000),
        entropy=secrets.token_bytes(64),
    )


async def make_unique(sandbox: Sandbox, identity: Identity) -> None:
    argv = [
        "sh", "-c", SCRIPT, "sh", f"{time.time():.6f}", identity.machine_id, identity.boot_id,
        identity.mac, str(identity.last_pid), identity.entropy.hex(),
    ]  # fmt: skip
    result = await run(sandbox, argv, timeout_s=UNIQUE_TIMEOUT_S)
    if not result.ok:
        raise SandboxError(
            f"making {sandbox.name} unique failed ({result.status}): {result.stderr[-500:].decode(errors='replace')}"
        )
