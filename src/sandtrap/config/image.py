"""``image``: what goes into the box's root file system (debootstrap's suite, mirror and packages)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from sandtrap.config.values import Section


class ImageSettings(Section):
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    packages: list[str] = Field(
        default_factory=lambda: [
            "bash",
            "coreutils",
            "procps",
            "iproute2",
            "less",
            "vim-tiny",
            "curl",
            "wget",
            "netcat-openbsd",
            "python3",
            "openssh-client",
            "openssh-sftp-server",
            "openssh-server",
            "file",
            "sudo",
            "ca-certificates",
            "iputils-ping",
            # busybox: its tftp and ftpget applets are what bots fetch payloads with (README Network)
            "busybox",
            "cron",
            "rsyslog",
            "net-tools",
            "psmisc",
            "lsof",
            "nano",
            "gzip",
            "bzip2",
            "xz-utils",
            "unzip",
            "git",
            "htop",
            "dnsutils",
            "lsb-release",
            "man-db",
            "bash-completion",
            # PID 1 of `sandbox.init: systemd` (with `init: sandtrap` they stay installed but idle, as on a box
            # whose init is ours: pam_systemd does nothing without logind).
            "systemd",
            "systemd-sysv",
            "dbus",
            "libpam-systemd",
            # Debian's "important" and "standard" priorities, as a server installed from the netinst has them
            # (not udev: no devices to manage), and the web role the lived-in story tells of.
            "apt-utils",
            "cpio",
            "debconf-i18n",
            "dmidecode",
            "fdisk",
            "ifupdown",
            "isc-dhcp-client",
            "kmod",
            "logrotate",
            "nftables",
            "sensible-utils",
            "tasksel",
            "whiptail",
            "apt-listchanges",
            "bind9-host",
            "debian-faq",
            "doc-debian",
            "krb5-locales",
            "libc-l10n",
            "locales",
            "manpages",
            "ncurses-term",
            "pciutils",
            "reportbug",
            "telnet",
            "traceroute",
            "wamerican",
            "tzdata",
            "rsync",
            "openssl",
            "unattended-upgrades",
            "nginx-light",
            "python3-flask",
            "gunicorn",
            "mariadb-client",
            "info",
            "bsdextrautils",
            "sysstat",
            "screen",
            "tmux",
            "strace",
            "tcpdump",
            "ethtool",
            "iptables",
        ]
    )
    extra_packages: list[str] = Field(default_factory=list)
    cache_dir: str = Field("", description="default: <data_dir>/cache")

    @field_validator("packages", "extra_packages")
    @classmethod
    def _pkgs(cls, v: list[str]) -> list[str]:
        for p in v:
            if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", p):
                raise ValueError(f"{p!r} is not a Debian package name")
        return v
