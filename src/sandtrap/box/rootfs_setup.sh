#!/bin/sh
# Finishes the image inside a throw-away build container: users, history, logs, small realism.
# Usage: setup.sh STAGE_DIR HOSTNAME
#   STAGE_DIR holds this script and the compiled init; it is removed at the end.
#   HOSTNAME is only used inside historic log lines; the live hostname comes from the runtime.
# The overlay files are already in place. Anything the base image lacks is skipped.
set -eu

STAGE=$1
HOST=$2
NOW=$(date -u +%s)
export LC_ALL=C

have() { command -v "$1" >/dev/null 2>&1; }
ago() { echo "@$((NOW - $1 * 86400 - ${2:-0}))"; }     # ago DAYS [SECONDS] -> a touch/date stamp
at() { echo "@$(((NOW / 86400 - $1) * 86400 + $2))"; }  # at DAYS SECONDS-AFTER-MIDNIGHT
say() { echo "setup: $*"; }

# --- PID 1 -------------------------------------------------------------------------------------
say "installing init"
rm -f /sbin/init
cp "$STAGE/init" /sbin/init
chmod 0755 /sbin/init
# Every box gets its own machine id at boot (init writes it): none is baked into the image.
rm -f /etc/machine-id /var/lib/dbus/machine-id
mkdir -p /usr/lib/openssh
cp "$STAGE/session" /usr/lib/openssh/sshd-session
chmod 0755 /usr/lib/openssh/sshd-session
# sandbox.init: systemd starts the box's listener (listener.c: port 22 for `sshd -i`, the logins the host starts) as
# Debian's own ssh.service: /sbin/init re-executed under the title sshd's listener has (it tells systemd it
# is ready, Type=notify, as sshd does). Two lines differ from the package's unit: ExecStart, and Restart=always
# for on-failure (logins need the listener back after a `pkill sshd`, as the small init
# restarts it; `systemctl stop ssh` still stops it).
unit=/lib/systemd/system/ssh.service
if [ -f "$unit" ] && grep -q '^ExecStart=/usr/sbin/sshd -D $SSHD_OPTS$' "$unit"; then
    say "ssh.service runs the listener"
    sed -i -e 's|^ExecStart=/usr/sbin/sshd -D $SSHD_OPTS$|ExecStart=@/sbin/init "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups"|' \
        -e 's|^Restart=on-failure$|Restart=always|' "$unit"
fi
# /var/log/wtmp tells the box's story (below), whose current boot is older than the box: systemd's boot and
# runlevel records would add a second boot "still running" today. Not pulled in by any target (the units
# stay, static, as on a machine whose admin unlinked them), rather than masked.
find /lib/systemd/system -path '*.target.wants/systemd-update-utmp*.service' -type l -delete

# --- users -------------------------------------------------------------------------------------
say "creating users"
add_user() {  # name uid gecos groups...
    name=$1 uid=$2 gecos=$3
    shift 3
    id "$name" >/dev/null 2>&1 || useradd -u "$uid" -m -d "/home/$name" -s /bin/bash -c "$gecos" -U "$name"
    mkdir -p "/home/$name"
    if [ -d /etc/skel ]; then cp -rn /etc/skel/. "/home/$name/"; fi
    for g in "$@"; do
        if getent group "$g" >/dev/null; then usermod -aG "$g" "$name"; fi
    done
}
add_user admin 1000 "Ops Admin,,," sudo adm www-data
add_user deploy 1001 "Deploy,,," www-data

# A random password nobody knows, hashed by chpasswd with the system's default method.
for u in root admin deploy; do
    printf '%s:%s\n' "$u" "$(head -c 24 /dev/urandom | base64 | tr -d '\n')" | chpasswd
done

# --- ssh material ------------------------------------------------------------------------------
known_hosts() {  # file "name,ip"...
    file=$1
    shift
    : > "$file"
    for h in "$@"; do
        ssh-keygen -q -t ed25519 -N '' -C '' -f "$STAGE/hostkey" </dev/null >/dev/null
        printf '%s %s\n' "$h" "$(cut -d' ' -f1,2 "$STAGE/hostkey.pub")" >> "$file"
        rm -f "$STAGE/hostkey" "$STAGE/hostkey.pub"
    done
    ssh-keygen -q -H -f "$file" >/dev/null 2>&1 || true
    rm -f "$file.old"
}
mkdir -p /root/.ssh /home/admin/.ssh
chmod 0700 /root/.ssh /home/admin/.ssh
if have ssh-keygen; then
    say "ssh keys"
    known_hosts /home/admin/.ssh/known_hosts \
        git.corp.internal,10.20.0.12 db01.corp.internal,10.20.2.21 backup01.corp.internal,10.20.2.40 \
        web-prod-01,10.20.1.11 web-prod-02,10.20.1.12 ops01.corp.internal,10.20.0.30
    known_hosts /root/.ssh/known_hosts backup01.corp.internal,10.20.2.40 db01.corp.internal,10.20.2.21
    for key in /etc/ssh/ssh_host_*_key; do  # the package made these on the build host: new ones, its name gone
        [ -f "$key" ] || continue
        type=${key#/etc/ssh/ssh_host_}
        rm -f "$key" "$key.pub"
        ssh-keygen -q -t "${type%_key}" -N '' -C "root@$HOST" -f "$key" </dev/null >/dev/null
    done
    ssh-keygen -q -t ed25519 -N '' -C "root@$HOST" -f /root/.ssh/backup_ed25519 </dev/null >/dev/null
    ssh-keygen -q -t ed25519 -N '' -C "admin@ws-ops-114" -f "$STAGE/laptop" </dev/null >/dev/null
    cp "$STAGE/laptop.pub" /home/admin/.ssh/authorized_keys
    rm -f "$STAGE/laptop" "$STAGE/laptop.pub"
fi

# --- the web app -------------------------------------------------------------------------------
APP=/var/www/inventory
if [ -d "$APP" ] && have git; then
    say "app history"
    commit() {  # days-ago seconds-after-midnight author message paths...
        d=$(date -u -d "$(at "$1" "$2")" '+%Y-%m-%dT%H:%M:%S+0000')
        who=$3 msg=$4
        shift 4
        git -C "$APP" add -f -- "$@"
        GIT_AUTHOR_DATE=$d GIT_COMMITTER_DATE=$d git -C "$APP" -c user.name="${who% <*}" \
            -c user.email="$(echo "$who" | sed 's/.*<\(.*\)>/\1/')" commit -q -m "$msg"
    }
    printf '%s\n' venv/ __pycache__/ '*.pyc' .env config/settings.ini > "$APP/.gitignore"
    git -C "$APP" -c init.defaultBranch=main init -q
    git -C "$APP" remote add origin git@git.corp.internal:it-ops/inventory.git
    git -C "$APP" config branch.main.remote origin
    git -C "$APP" config branch.main.merge refs/heads/main
    jk="Jonas Keller <j.keller@corp.internal>"
    pn="Priya Nair <p.nair@corp.internal>"
    cp "$APP/inventory/views.py" "$STAGE/views.py"
    sed -i '/^@bp.route("\/admin\/")/,$d' "$APP/inventory/views.py"  # the admin page came later
    commit 212 36840 "$jk" "Initial import of inventory app" .gitignore requirements.txt wsgi.py \
        inventory/__init__.py inventory/db.py inventory/views.py templates/base.html
    commit 190 54120 "$jk" "Asset list with paging" templates/assets.html static/css/main.css
    commit 161 42420 "$pn" "JSON API for CMDB sync (token protected)" inventory/api.py
    commit 97 59460 "$pn" "README: deploy notes, internal API" README.md
    cp "$STAGE/views.py" "$APP/inventory/views.py"
    commit 41 33120 "$jk" "Admin page: list users" inventory/views.py
    git -C "$APP" update-ref refs/remotes/origin/main HEAD
fi
if [ -d "$APP" ]; then
    chown -R admin:www-data "$APP"
    chmod 0640 "$APP/.env" "$APP/config/settings.ini"
fi
chmod 0600 /root/.my.cnf 2>/dev/null || true

# --- system settings ---------------------------------------------------------------------------
say "system settings"
echo Etc/UTC > /etc/timezone
if [ -e /usr/share/zoneinfo/Etc/UTC ]; then ln -sf /usr/share/zoneinfo/Etc/UTC /etc/localtime; fi
for svc in cron sshd; do  # no CAP_AUDIT_CONTROL here: a failing pam_loginuid must not block sessions
    if [ -f "/etc/pam.d/$svc" ]; then
        sed -i 's/^session\s\+required\s\+pam_loginuid\.so/session    optional     pam_loginuid.so/' "/etc/pam.d/$svc"
    fi
done
ID="" VERSION_ID="" VERSION_CODENAME=""
[ -r /etc/os-release ] && . /etc/os-release
if [ "$ID" = debian ] && [ -n "$VERSION_ID" ]; then
    printf 'Debian GNU/Linux %s \\n \\l\n\n' "$VERSION_ID" > /etc/issue
    printf 'Debian GNU/Linux %s\n' "$VERSION_ID" > /etc/issue.net
    cat > /etc/motd <<'EOF'

The programs included with the Debian GNU/Linux system are free software;
the exact distribution terms for each program are described in the
individual files in /usr/share/doc/*/copyright.

Debian GNU/Linux comes with ABSOLUTELY NO WARRANTY, to the extent
permitted by applicable law.
EOF
    if [ -n "$VERSION_CODENAME" ] && [ -f /etc/apt/sources.list ] && ! grep -q security /etc/apt/sources.list; then
        cat >> /etc/apt/sources.list <<EOF
deb http://deb.debian.org/debian $VERSION_CODENAME-updates main
deb http://deb.debian.org/debian-security $VERSION_CODENAME-security main
EOF
    fi
fi

# --- age the base system -----------------------------------------------------------------------
# The base system "was installed" months ago: move today's dates (file times, package logs) there.
INSTALLED=$((NOW - 212 * 86400 - 9000))
for f in /var/log/dpkg.log /var/log/alternatives.log /var/log/apt/history.log /var/log/apt/term.log; do
    if [ -f "$f" ]; then sed -i "s/$(date -u +%F)/$(date -u -d "@$INSTALLED" +%F)/g" "$f"; fi
done
find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path "$STAGE" \) -prune \
    -o -newermt "@$((NOW - 86400))" -exec touch -h -d "@$INSTALLED" {} + 2>/dev/null || true

# --- the web role ------------------------------------------------------------------------------
if [ -f /etc/nginx/sites-available/inventory ] && [ -d /etc/nginx/sites-enabled ]; then
    say "nginx: the inventory site replaces the default one"
    rm -f /etc/nginx/sites-enabled/default
    ln -sfn /etc/nginx/sites-available/inventory /etc/nginx/sites-enabled/inventory
fi

# --- historic logs -----------------------------------------------------------------------------
say "logs"
mkdir -p /var/log/nginx /var/backups/inventory
access_day() {  # days-ago -> one day of nginx "combined" lines
    day=$((NOW / 86400 - $1))
    limit=86400
    [ "$1" -eq 0 ] && limit=$((NOW % 86400 - 600))
    awk -v seed="$day" -v limit="$limit" -v d="$(date -u -d "@$((day * 86400))" +%d/%b/%Y)" '
    BEGIN {
        srand(seed)
        split("10.20.4.17 10.20.4.23 10.20.5.102 10.20.5.88 10.20.6.14 10.20.7.201 10.20.4.61 10.20.0.30", ip, " ")
        n = split("/|/assets|/assets?page=2|/assets?page=3|/assets/1187|/assets/2043|/assets/311|/login|" \
            "/api/v1/assets|/api/v1/assets|/api/v1/internal/sync|/api/v1/internal/export|/admin/|" \
            "/admin/users|/static/css/main.css|/favicon.ico|/healthz|/healthz|/healthz", path, "|")
        split("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36|" \
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15|" \
            "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0|python-requests/2.31.0", ua, "|")
        count = 40 + int(rand() * 25)
        for (i = 0; i < count; i++) {
            t = int((i + rand()) * 86400 / count)
            if (t > limit) break
            p = path[1 + int(rand() * n)]
            s = 200; b = 1800 + int(rand() * 9000); m = "GET"; who = ip[1 + int(rand() * 7)]; agent = ua[1 + int(rand() * 3)]
            if (p ~ /internal/) { who = ip[8]; agent = ua[4]; if (p ~ /sync/) m = "POST" }
            if (p == "/healthz") { who = "10.20.0.5"; agent = "kube-probe/1.27"; b = 2 }
            if (p ~ /^\/admin/) { if (rand() < 0.6) { s = 302; b = 219 } else if (rand() < 0.3) { s = 403; b = 162 } }
            if (p == "/login") s = 302
            if (p ~ /static|favicon/) { s = rand() < 0.7 ? 304 : 200; if (s == 304) b = 0 }
            if (rand() < 0.02) { s = 502; b = 166 }
            printf "%s - - [%s:%02d:%02d:%02d +0000] \"%s %s HTTP/1.1\" %d %d \"-\" \"%s\"\n", \
                who, d, t / 3600, (t % 3600) / 60, t % 60, m, p, s, b, agent
        }
    }'
}
: > /var/log/nginx/access.log
: > /var/log/nginx/access.log.1
for n in 13 12 11 10 9 8 7; do access_day "$n" >> /var/log/nginx/access.log.1; done
for n in 6 5 4 3 2 1 0; do access_day "$n" >> /var/log/nginx/access.log; done
: > /var/log/nginx/error.log
touch -d "$(ago 7 30000)" /var/log/nginx/access.log.1
touch -d "$(ago 0 600)" /var/log/nginx/access.log
touch -d "$(ago 3 20000)" /var/log/nginx/error.log

auth_day() {  # days-ago -> a working day of ssh/sudo/cron lines in rsyslog's default format
    day=$((NOW / 86400 - $1))
    limit=86400
    [ "$1" -eq 0 ] && limit=$((NOW % 86400 - 900))
    awk -v seed="$day" -v ago="$1" -v limit="$limit" -v host="$HOST" -v d="$(date -u -d "@$((day * 86400))" +%Y-%m-%d)" '
    function stamp(t) { return sprintf("%sT%02d:%02d:%02d.%06d+00:00", d, t / 3600, (t % 3600) / 60, t % 60, int(rand() * 999999)) }
    function line(t, prog, msg) { if (t <= limit && t < 86400) printf "%s %s %s[%d]: %s\n", stamp(t), host, prog, pid, msg }
    BEGIN {
        srand(seed); pid = 20000 + int(rand() * 40000)
        for (h = 0; h < 24; h++) {
            pid += 37; line(h * 3600 + 1020, "CRON", "pam_unix(cron:session): session opened for user root(uid=0) by (uid=0)")
            line(h * 3600 + 1021, "CRON", "pam_unix(cron:session): session closed for user root")
            if (h == 8 || h == 13 || (h == 16 && rand() < 0.5)) {
                pid += 101; t = h * 3600 + int(rand() * 3000); port = 40000 + int(rand() * 25000)
                ip = sprintf("10.20.4.%d", 17 + int(rand() * 3))
                line(t, "sshd", sprintf("Accepted publickey for admin from %s port %d ssh2: ED25519 SHA256:q3Zk0rWm8yQv1kJc4H2tP7xN9bLs5fGdE6aUoYhRiTw", ip, port))
                line(t, "sshd", "pam_unix(sshd:session): session opened for user admin(uid=1000) by (uid=0)")
                if (rand() < 0.7) {
                    pid += 5; s = t + 60 + int(rand() * 600)
                    line(s, "sudo", "   admin : TTY=pts/0 ; PWD=/var/www/inventory ; USER=root ; COMMAND=/usr/bin/systemctl restart inventory")
                    line(s, "sudo", "pam_unix(sudo:session): session opened for user root(uid=0) by admin(uid=1000)")
                    line(s + 2, "sudo", "pam_unix(sudo:session): session closed for user root")
                    pid -= 5
                }
                e = t + 900 + int(rand() * 2400)
                line(e, "sshd", sprintf("Received disconnect from %s port %d:11: disconnected by user", ip, port))
                line(e, "sshd", sprintf("Disconnected from user admin %s port %d", ip, port))
                line(e, "sshd", "pam_unix(sshd:session): session closed for user admin")
            }
            if (h == 10 && (rand() < 0.3 || ago == 5)) {  # root now and then, from the ops box (5 days ago: .bash_history)
                pid += 53; t = h * 3600 + int(rand() * 3000); port = 40000 + int(rand() * 25000)
                line(t, "sshd", sprintf("Accepted publickey for root from 10.20.0.30 port %d ssh2: ED25519 SHA256:Xn4vQ0pLr7Tg2sWc9YhKd1mBu5eZoA3iFj8NqRt6GyE", port))
                line(t, "sshd", "pam_unix(sshd:session): session opened for user root(uid=0) by (uid=0)")
                e = t + 120 + int(rand() * 900)
                line(e, "sshd", sprintf("Received disconnect from 10.20.0.30 port %d:11: disconnected by user", port))
                line(e, "sshd", sprintf("Disconnected from user root 10.20.0.30 port %d", port))
                line(e, "sshd", "pam_unix(sshd:session): session closed for user root")
            }
        }
    }' | sort
}
: > /var/log/auth.log
for n in 20 19 18 17 16 15 14 13 12 11 10 9 8 7 6 5 4 3 2 1 0; do auth_day "$n" >> /var/log/auth.log; done
touch -d "$(ago 0 900)" /var/log/auth.log

# The login records that go with that history: wtmp (`last`) gets every ssh login and logout of
# auth.log on pts/N, and two reboots (kernel updates); lastlog holds each user's newest login.
if have python3; then
    python3 - "$(at 20 21600)" "$(at 9 20400)" "$(uname -r)" "$((NOW - 900))" <<'PY'
import os, re, struct, sys
from datetime import datetime

boots = [int(a.lstrip("@")) for a in sys.argv[1:3]]
kernel = sys.argv[3]
UT = "<hhi32s4s32s256shhiii4I20x"  # glibc's struct utmp on 64-bit Linux: 384 bytes
LL = "<i32s256s"  # struct lastlog: 292 bytes


def utmp(kind, pid, line, ut_id, user, host, t, addr=b""):
    a = struct.unpack("<I", bytes(map(int, addr.split(b".")))) if addr else (0,)
    return struct.pack(UT, kind, 0, pid, line, ut_id, user, host, 0, 0, 0, t, 0, a[0], 0, 0, 0)


events = []  # (time, record)
for t in boots:  # a reboot: the shutdown, the boot, the runlevel
    events.append((t - 40, utmp(1, 0, b"~", b"~~", b"shutdown", kernel.encode(), t - 40)))
    events.append((t, utmp(2, 0, b"~", b"~~", b"reboot", kernel.encode(), t)))
    events.append((t + 9, utmp(1, 53, b"~", b"~~", b"runlevel", kernel.encode(), t + 9)))
pat = re.compile(r"^(\S+) \S+ sshd\[(\d+)\]: (?:Accepted \S+ for (\S+) from (\S+) port|pam_unix\(sshd:session\): session (closed))")
opened, busy, last = {}, {}, {}
with open("/var/log/auth.log", encoding="utf-8") as f:
    for raw in f:
        m = pat.match(raw)
        if not m:
            continue
        t, pid = int(datetime.fromisoformat(m.group(1)).timestamp()), int(m.group(2))
        if m.group(3):
            n = min(set(range(len(busy) + 1)) - set(busy.values()))
            busy[pid] = n
            opened[pid] = (m.group(3), m.group(4), n)
            line = f"pts/{n}".encode()
            events.append((t, utmp(7, pid, line, str(n).encode(), m.group(3).encode(), m.group(4).encode(), t, m.group(4).encode())))
            last[m.group(3)] = (t, line, m.group(4).encode())
        elif pid in opened:
            user, host, n = opened.pop(pid)
            busy.pop(pid, None)
            events.append((t, utmp(8, pid, f"pts/{n}".encode(), str(n).encode(), b"", b"", t)))
for pid, (user, host, n) in opened.items():  # still open when the log ends: logged out then
    end = int(sys.argv[4])
    events.append((end, utmp(8, pid, f"pts/{n}".encode(), str(n).encode(), b"", b"", end)))
events.sort(key=lambda e: e[0])
with open("/var/log/wtmp", "wb") as f:
    f.write(b"".join(r for _, r in events))
uids = {}
with open("/etc/passwd", encoding="utf-8") as f:
    for row in f:
        parts = row.split(":")
        uids[parts[0]] = int(parts[2])
with open("/var/log/lastlog", "r+b" if os.path.exists("/var/log/lastlog") else "w+b") as f:
    for user, (t, line, host) in last.items():
        f.seek(uids[user] * struct.calcsize(LL))
        f.write(struct.pack(LL, t, line, host))
PY
    chown root:utmp /var/log/wtmp /var/log/lastlog 2>/dev/null || true
    chmod 0664 /var/log/wtmp /var/log/lastlog
    touch -d "$(ago 0 900)" /var/log/wtmp /var/log/lastlog
fi

: > /var/log/db-backup.log
for n in 13 12 11 10 9 8 7 6 5 4 3 2 1; do
    day=$(date -u -d "$(ago "$n")" +%F)
    {
        echo "$day 02:15:01 dumping inventory from db01.corp.internal"
        echo "$day 02:16:4$((n % 10)) archiving /var/www/inventory"
        echo "$day 02:16:5$((n % 10)) shipping to backup@backup01.corp.internal:/srv/backups/$HOST"
        echo "$day 02:17:1$((n % 10)) done"
    } >> /var/log/db-backup.log
done
touch -d "$(at 1 8231)" /var/log/db-backup.log

bcrypt() { printf '$2b$12$%s' "$(head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9./' | head -c 53)"; }
dump_sql() {  # date -> a small mysqldump-looking file
    echo "-- MySQL dump 10.19  Distrib 10.11.6-MariaDB, for debian-linux-gnu (x86_64)"
    echo "--"
    echo "-- Host: db01.corp.internal    Database: inventory"
    echo "-- ------------------------------------------------------"
    echo "-- Server version	10.11.6-MariaDB-0+deb12u1-log"
    echo
    echo "DROP TABLE IF EXISTS \`users\`;"
    echo "CREATE TABLE \`users\` (\`id\` int(11) NOT NULL AUTO_INCREMENT, \`username\` varchar(64) NOT NULL,"
    echo "  \`email\` varchar(128) NOT NULL, \`password_hash\` varchar(72) NOT NULL, \`role\` varchar(16) NOT NULL,"
    echo "  \`last_login\` datetime DEFAULT NULL, PRIMARY KEY (\`id\`)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;"
    echo "INSERT INTO \`users\` VALUES (1,'jkeller','j.keller@corp.internal','$(bcrypt)','admin','$1 08:41:10'),"
    echo "(2,'pnair','p.nair@corp.internal','$(bcrypt)','admin','$1 09:02:55'),"
    echo "(3,'mbauer','m.bauer@corp.internal','$(bcrypt)','editor','$1 07:58:31'),"
    echo "(4,'helpdesk','helpdesk@corp.internal','$(bcrypt)','editor','$1 10:12:04'),"
    echo "(5,'cmdb-sync','ops@corp.internal','$(bcrypt)','api',NULL);"
    echo
    echo "DROP TABLE IF EXISTS \`assets\`;"
    echo "CREATE TABLE \`assets\` (\`id\` int(11) NOT NULL AUTO_INCREMENT, \`tag\` varchar(32) NOT NULL,"
    echo "  \`hostname\` varchar(64) DEFAULT NULL, \`owner\` varchar(64) DEFAULT NULL, \`location\` varchar(64) DEFAULT NULL,"
    echo "  \`updated_at\` datetime NOT NULL, PRIMARY KEY (\`id\`)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;"
    echo "INSERT INTO \`assets\` VALUES (311,'IT-00311','ws-ops-114','jkeller','HQ 3.12','$1 01:12:40'),"
    echo "(1187,'IT-01187','db01','ops','DC1 R4 U22','$1 01:12:40'),(2043,'IT-02043','web-prod-01','ops','DC1 R4 U30','$1 01:12:40');"
    echo "-- Dump completed on $1  2:16:38"
}
for n in 6 5 4 3 2 1; do
    day=$(date -u -d "$(ago "$n")" +%F)
    dump_sql "$day" | gzip -6 > "/var/backups/inventory/inventory-$day.sql.gz"
    touch -d "$(at "$n" 8198)" "/var/backups/inventory/inventory-$day.sql.gz"
done
chmod 0600 /var/backups/inventory/*
chown root:adm /var/log/auth.log /var/log/db-backup.log 2>/dev/null || true
chown www-data:adm /var/log/nginx/* 2>/dev/null || true
chmod 0640 /var/log/auth.log /var/log/db-backup.log /var/log/nginx/*

# --- ownership and plausible dates -------------------------------------------------------------
say "ownership and dates"
for u in admin deploy; do
    chown -R "$u:$u" "/home/$u"
    chmod 0700 "/home/$u"
done
chmod 0600 /home/admin/.bash_history /root/.bash_history
# Everything we added "was deployed" soon after, then used since.
for p in /etc/cron.d/db-backup /usr/local/bin/db-backup.sh /etc/rsyslog.conf /etc/systemd/system/inventory.service \
    /root/.my.cnf /home/admin /home/deploy /root/.ssh /home/admin/.ssh /var/www/inventory; do
    if [ -e "$p" ]; then find "$p" -exec touch -h -d "$(ago 212 7300)" {} +; fi
done
[ -d "$APP/.git" ] && find "$APP" -exec touch -h -d "$(ago 41 30000)" {} +
touch -d "$(ago 161 3100)" /root/.my.cnf /usr/local/bin/db-backup.sh /etc/cron.d/db-backup
touch -d "$(ago 5 52000)" /root/.bash_history /root
touch -d "$(ago 1 31000)" /home/admin/.bash_history /home/admin
touch -d "$(at 1 8198)" /var/backups/inventory
touch -d "$(at 7 22800)" /var/log/nginx

# ping: a box holds no CAP_NET_RAW, and execve refuses a program whose file capabilities lie outside the bounding
# set ("Operation not permitted"); without them iputils' ping uses an ICMP datagram socket (ping_group_range).
if command -v setcap >/dev/null 2>&1; then setcap -r /usr/bin/ping 2>/dev/null || true; fi

# --- tidy up -----------------------------------------------------------------------------------
say "tidy"
rm -rf /root/.cache /root/.lesshst /root/.wget-hsts /var/cache/apt/*.bin
rm -rf "$STAGE"
say "done"
