"""``network.mode: capture`` on the micro-VM backend (issue 16 on issue 15's tap): the honeypot on 127.0.0.1 with
``sandbox.backend: microvm`` (TCG here), one VM serving every check. The gateway serves the VM inside the VM's own
network namespace (network/vmtap.py): the guest's DNS is answered, its wget gets the test's payload through the
fetcher (``network.egress.hosts``/``allow`` point the name at the test's own HTTP server on 127.0.0.1), the
download is an event with its sha256 and a stored artifact, the session has a pcap, and the guest's curl trusts
the sensor's CA. Isolation by inspection only: links, routes, rules and forwarding in the VM's namespace.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from test_capture import NAME, PAYLOAD, Internet, capture_config, internet  # noqa: F401

from sandtrap.app import cache_dir, running, vm_planted_files
from sandtrap.config import Settings, merge
from sandtrap.events import (
    NETWORK_DNS,
    NETWORK_PCAP,
    SESSION_CLOSED,
    SESSION_FILE_DOWNLOAD,
    SESSION_FILE_DOWNLOAD_FAILED,
    CaptureSink,
    Event,
)
from sandtrap.sandbox.microvm.backend import MicroVMBackend, access_key_path, guest_files
from sandtrap.sandbox.microvm.guest import load_access_key
from sandtrap.sandbox.microvm.image import build_vm_image

from sshclient import PASSWORD, ssh_argv
from sshclient import run as client

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "microvm-test"  # as test_microvm.py: the same keys, the same image

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(os.geteuid() != 0, reason="a VM's network namespace and tap need root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="apt-get install qemu-system-x86"),
    pytest.mark.skipif(shutil.which("sshpass") is None, reason="apt-get install sshpass"),
]


def _settings(port: int) -> Settings:
    base: dict[str, Any] = {
        "sensor": f"vmcap-{secrets.token_hex(3)}",  # a capture gateway namespace of its own
        "storage": {"data_dir": str(DATA)},
        "image": {"cache_dir": str(ROOT / "data" / "cache")},
        "ssh": {"listen": "127.0.0.1:0"},
        "api": {"listen": "127.0.0.1:0"},
        # network.subnet left at its default: the guest's address is baked into the image, so this test shares
        # the other VM tests' image and template (a subnet of its own cost an image build and a cold boot).
        "network": {k: v for k, v in capture_config(port).items() if k != "subnet"},
        "sandbox": {
            "backend": "microvm",
            "microvm": {"memory": "512m", "vcpus": 1},
            "pool_size": 0,
            "affinity": "source_ip",
        },
        "auth": {
            "credentials": [{"username": "root", "password": PASSWORD}],
            "accept_all_after": 0,
            "failure_delay_s": 0,
            "success_delay_s": 0,
        },
    }
    return Settings.model_validate(merge(base, {}))


async def _cmd(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await proc.communicate()
    return out.decode(errors="replace")


async def _ns(pid: int, *argv: str) -> str:
    """A command in the VM's network namespace (inspection only)."""
    return await _cmd("nsenter", "-t", str(pid), "-n", *argv)


async def _wait(capture: CaptureSink, eventid: str, timeout_s: float = 60.0, **fields: Any) -> Event:
    async with asyncio.timeout(timeout_s):
        while True:
            for e in capture.events:
                if e.eventid == eventid and all(e.get(k) == v for k, v in fields.items()):
                    return e
            await asyncio.sleep(0.1)


async def test_the_guest_resolves_downloads_and_is_captured(internet: Internet) -> None:
    settings = _settings(internet.port)
    key = load_access_key(access_key_path(settings.data_dir / "microvm"))
    guest = guest_files(settings.sandbox, key, vm_planted_files(settings))
    t0 = time.monotonic()
    image, built = await build_vm_image(settings.image, guest, cache_dir(settings), console=Console(quiet=True))
    print(f"[vmcapture] image {image.directory.name}: {'built' if built else 'reused'} in {time.monotonic() - t0:.0f}s")
    capture = CaptureSink()
    url = f"http://{NAME}:{internet.port}/bins.sh"
    command = (
        f"getent hosts {NAME}; getent hosts {NAME}; wget -q -O /tmp/w.sh {url}; sha256sum /tmp/w.sh; "
        f"curl -sS -m 60 -o /dev/null -w 'https=%{{http_code}} ' https://{NAME}/x.sh; echo tls=$?; "
        f"ping -c 1 -W 5 {NAME} >/dev/null; echo ping=$?; "
        "curl -sS -m 20 -o /tmp/t tftp://198.18.5.5/mips.bin; echo tftp=$?"
    )
    vms = DATA / "microvm" / "vms"
    try:
        async with running(settings, sinks=[capture]) as services:
            backend = services.backend
            assert isinstance(backend, MicroVMBackend)
            t1 = time.monotonic()
            r = await client(ssh_argv(services.ssh.port, command), timeout_s=600)
            session_s = time.monotonic() - t1
            out = r.stdout.decode(errors="replace")
            assert r.returncode == 0, (r, out)
            closed = await _wait(capture, SESSION_CLOSED, timeout_s=120)
            pcap_event = await _wait(capture, NETWORK_PCAP, timeout_s=60, session=closed.session)
            vm = next(iter(backend._live.values()))
            pid = vm.record.pid

            # DNS: answered, the same address both times within the VM's life.
            lines = [ln.split()[0] for ln in out.splitlines() if ln.endswith(NAME)]
            assert len(lines) == 2 and lines[0] == lines[1], out
            dns = [
                e
                for e in capture.events
                if e.eventid == NETWORK_DNS and e.get("query") == NAME and e.get("qtype") == "A"
            ]
            assert dns and dns[0].get("answer") == lines[0], dns

            # The download: the guest got the payload; an event with its sha256 and the stored file.
            digest = hashlib.sha256(PAYLOAD).hexdigest()
            assert f"{digest}  /tmp/w.sh" in out, out
            downloads = [e for e in capture.events if e.eventid == SESSION_FILE_DOWNLOAD and e.get("url") == url]
            assert downloads and downloads[0].get("shasum") == digest, downloads
            stored = settings.data_dir / str(downloads[0].get("outfile"))
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
            assert internet.requests.count("/bins.sh") == 1, internet.requests  # the fetcher's one GET, nothing else
            assert internet.forbidden_hits == 0

            # HTTPS: the guest's curl verifies the gateway's certificate (the sensor's CA, baked in the image).
            assert "tls=0" in out and "https=" in out, out
            assert "ping=0" in out, out  # ICMP echo to the name's address: answered in the VM's namespace
            # TFTP: answered in the VM's namespace too (not fetched: the address is not allowed), recorded.
            assert "tftp=68" in out, out  # curl: "TFTP: File Not Found"
            failed = [e.get("url") for e in capture.events if e.eventid == SESSION_FILE_DOWNLOAD_FAILED]
            assert "tftp://198.18.5.5/mips.bin" in failed, failed

            # The pcap: the guest's traffic on tap0, readable by tshark when installed.
            pcap = settings.data_dir / str(pcap_event.get("pcap"))
            assert pcap.stat().st_size > 24 and int(pcap_event.get("packets") or 0) > 10, pcap_event
            if shutil.which("tshark"):
                shown = await _cmd("tshark", "-r", str(pcap), "-Y", "http.request")
                assert "GET /bins.sh" in shown, shown
            print(
                f"[vmcapture] boot {vm.boot_s:.1f}s; session (dns, wget {len(PAYLOAD)} B, curl https, ping) "
                f"{session_s:.1f}s; pcap {pcap_event.get('size')} B, {pcap_event.get('packets')} packets"
            )

            # Isolation, by inspection: the VM's namespace holds lo and tap0 only, no default route, no forwarding,
            # the gateway's REDIRECTs on tap0 and FORWARD DROP; the host has no tap of ours.
            links = await _ns(pid, "ip", "-o", "link", "show")
            assert sorted(ln.split(":")[1].strip() for ln in links.splitlines()) == ["lo", "tap0"], links
            routes = await _ns(pid, "ip", "route", "show", "table", "all")
            assert not any(ln.startswith("default") for ln in routes.splitlines()) and " via " not in routes, routes
            assert "local default dev lo scope host" in routes, routes  # every address local: nothing routed out
            assert (await _ns(pid, "cat", "/proc/sys/net/ipv4/ip_forward")).strip() == "0"
            rules = await _ns(pid, "iptables", "-w", "-S")
            assert "-P FORWARD DROP" in rules and f"-A INPUT ! -s {settings.network.subnet} -i tap0 -j DROP" in rules, (
                rules
            )
            nat = await _ns(pid, "iptables", "-w", "-t", "nat", "-S")
            assert "-A PREROUTING -i tap0 -p tcp -j REDIRECT --to-ports 1" in nat, nat
            assert "MASQUERADE" not in nat and "SNAT" not in nat and "DNAT" not in nat, nat
            assert "tap0" not in await _cmd("ip", "-o", "link")
    finally:  # the VM the pool kept for forensics: the shared data dir keeps none (test_microvm counts them)
        for directory in vms.iterdir() if vms.exists() else ():
            shutil.rmtree(directory, ignore_errors=True)
