/*
 * What sshd does in the box for one session, so a login looks like sshd's from inside:
 *
 *   sshd-session [-s] [-f TIME:METHOD:USER]... -- USER REMOTE_IP REMOTE_PORT METHOD [COMMAND]
 *   sshd-session -x -- USER REMOTE_IP REMOTE_PORT -
 *
 * The first session of a connection logs its login to the auth log: a "Failed METHOD for [invalid
 * user ]USER from IP port PORT ssh2" line (and PAM's) per -f, at the time it happened, then
 * "Accepted METHOD for USER from IP port PORT ssh2" and the PAM "session opened" line. METHOD "-"
 * is a later channel of the same connection: sshd logs a connection's login once.
 *
 * With a terminal on stdin (an interactive login): write the utmp, wtmp and lastlog records with
 * the remote address, print the uname line, /etc/motd and "Last login: ... from ...", then run
 * the user's shell as a login shell ("-bash") in $HOME. This process stays as its parent, named
 * "sshd: USER@pts/N" as sshd's session process is, removes the utmp record at logout, and exits
 * with the shell's status (128+N if a signal ended it), which the caller passes on to the client.
 * Without a terminal: the same records are not written (sshd writes none for exec sessions);
 * COMMAND runs as "$SHELL -c COMMAND" under a parent named "sshd: USER@notty". Either way the
 * user's runtime directory /run/user/UID exists (pam_systemd's), 0700 and the user's.
 *
 * -s: wait (250 ms at most) until the caller has moved this process into its session scope.
 *
 * -x: the connection is over: log sshd's disconnect lines and "session closed", under the pid
 * that logged its "Accepted" line.
 *
 * The environment is the caller's (it is sshd's session environment already). Runs as root.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <lastlog.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>
#include <utmpx.h>

#include "accounts.h"

static pid_t child;

static void forward(int sig)
{
	if (child > 0)
		kill(child, sig);
}

/* Rename this process the way ps shows sshd's session process. */
static void set_title(int argc, char **argv, const char *title)
{
	char *start = argv[0];
	char *end = argv[argc - 1] + strlen(argv[argc - 1]);
	size_t room = (size_t)(end - start);
	memset(start, 0, room);
	strncpy(start, title, room);
	prctl(PR_SET_NAME, "sshd", 0, 0, 0);
}

static void fill_utmp(struct utmpx *ut, short type, const char *line, const char *user, const char *host)
{
	struct timeval tv;
	memset(ut, 0, sizeof(*ut));
	ut->ut_type = type;
	ut->ut_pid = getpid();
	strncpy(ut->ut_line, line, sizeof(ut->ut_line) - 1);
	/* sshd's id: the line without its "pts/" prefix, as in "ts/0" -> "0" style abbreviations. */
	const char *id = strncmp(line, "pts/", 4) == 0 ? line + 4 : line;
	strncpy(ut->ut_id, id, sizeof(ut->ut_id));
	if (user)
		strncpy(ut->ut_user, user, sizeof(ut->ut_user) - 1);
	if (host) {
		strncpy(ut->ut_host, host, sizeof(ut->ut_host) - 1);
		struct in6_addr a6;
		struct in_addr a4;
		if (inet_pton(AF_INET, host, &a4) == 1)
			memcpy(ut->ut_addr_v6, &a4, sizeof(a4));
		else if (inet_pton(AF_INET6, host, &a6) == 1)
			memcpy(ut->ut_addr_v6, &a6, sizeof(a6));
	}
	gettimeofday(&tv, NULL);
	ut->ut_tv.tv_sec = tv.tv_sec;
	ut->ut_tv.tv_usec = tv.tv_usec;
}

static void write_utmp(const struct utmpx *ut)
{
	setutxent();
	pututxline(ut);
	endutxent();
	updwtmpx("/var/log/wtmp", ut);
}

/* Print the previous login (as sshd's PrintLastLog does) and record this one. */
static void lastlog(uid_t uid, const char *line, const char *host)
{
	struct lastlog ll;
	int fd = open("/var/log/lastlog", O_RDWR | O_CREAT, 0664);
	if (fd < 0)
		return;
	off_t off = (off_t)uid * (off_t)sizeof(ll);
	memset(&ll, 0, sizeof(ll));
	if (pread(fd, &ll, sizeof(ll), off) == (ssize_t)sizeof(ll) && ll.ll_time != 0) {
		time_t t = ll.ll_time;
		char when[64];
		strftime(when, sizeof(when), "%a %b %e %H:%M:%S %Y", localtime(&t));
		if (ll.ll_host[0])
			printf("Last login: %s from %.*s\n", when, (int)sizeof(ll.ll_host), ll.ll_host);
		else
			printf("Last login: %s on %.*s\n", when, (int)sizeof(ll.ll_line), ll.ll_line);
	}
	memset(&ll, 0, sizeof(ll));
	ll.ll_time = (int32_t)time(NULL);
	strncpy(ll.ll_line, line, sizeof(ll.ll_line) - 1);
	strncpy(ll.ll_host, host, sizeof(ll.ll_host) - 1);
	if (pwrite(fd, &ll, sizeof(ll), off) != (ssize_t)sizeof(ll))
		(void)0;
	close(fd);
}

/* Debian's login banner: uname (from update-motd's 10-uname), a blank line, /etc/motd. */
static void motd(void)
{
	struct utsname u;
	if (uname(&u) == 0)
		printf("%s %s %s %s %s\n\n", u.sysname, u.nodename, u.release, u.version, u.machine);
	FILE *f = fopen("/etc/motd", "r");
	if (f) {
		char buf[512];
		while (fgets(buf, sizeof(buf), f)) {
			size_t n = strcspn(buf, "\n");
			printf("%.*s\n", (int)n, buf);
		}
		fclose(f);
	}
}

/* Names the client chose, as sshd logs them (strnvis): printable ASCII as is, the rest as \ooo. */
static void vis(char *out, size_t room, const char *in, size_t max_in)
{
	size_t o = 0;
	for (size_t i = 0; in[i] && i < max_in && o + 5 < room; i++) {
		unsigned char c = (unsigned char)in[i];
		if (c == '\\') {
			out[o++] = '\\';
			out[o++] = '\\';
		} else if (c >= 0x20 && c < 0x7f) {
			out[o++] = (char)c;
		} else {
			o += (size_t)snprintf(out + o, room - o, "\\%03o", c);
		}
	}
	out[o] = 0;
}

/* One auth log line with a time of its own (a failed password from before this process): straight
 * into the file in rsyslog's format, since rsyslog stamps what reaches /dev/log with its arrival. */
static void auth_log_at(double when, const char *fmt, ...)
{
	char msg[1024], stamp[32], zone[8], line[1400];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	time_t t = (time_t)when;
	long usec = (long)((when - (double)t) * 1e6);
	struct tm tm;
	struct utsname u;
	if (localtime_r(&t, &tm) == NULL || uname(&u) != 0)
		return;
	strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
	strftime(zone, sizeof(zone), "%z", &tm); /* +0000 -> +00:00 below */
	int n = snprintf(line, sizeof(line), "%s.%06ld%.3s:%s %s sshd[%d]: %s\n", stamp, usec, zone, zone + 3,
			 u.nodename, (int)getpid(), msg);
	if (n <= 0 || (size_t)n >= sizeof(line))
		return;
	int fd = open("/var/log/auth.log", O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
	if (fd < 0)
		return;
	if (write(fd, line, (size_t)n) != n)
		(void)0;
	close(fd);
}

/* sshd's lines for a wrong password: "TIME:METHOD:USER" as the caller recorded it. */
static void log_failure(const char *spec, const char *host, const char *port)
{
	char *end;
	double when = strtod(spec, &end);
	if (*end != ':')
		return;
	const char *method = end + 1, *name = strchr(method, ':');
	if (!name)
		return;
	char meth[64], who[512];
	snprintf(meth, sizeof(meth), "%.*s", (int)(name - method), method);
	vis(who, sizeof(who), name + 1, 100);
	if (find_user(name + 1)) {
		auth_log_at(when, "pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= "
				  "rhost=%s  user=%s", host, who);
		auth_log_at(when, "Failed %s for %s from %s port %s ssh2", meth, who, host, port);
	} else {
		auth_log_at(when, "Invalid user %s from %s port %s", who, host, port);
		auth_log_at(when, "pam_unix(sshd:auth): check pass; user unknown");
		auth_log_at(when, "pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= "
				  "rhost=%s", host);
		auth_log_at(when, "Failed %s for invalid user %s from %s port %s ssh2", meth, who, host, port);
	}
}

/* The pid in the connection's "Accepted ... for USER from IP port PORT" line, or 0. */
static pid_t accepted_pid(const char *user, const char *host, const char *port)
{
	char needle[512], buf[2048];
	snprintf(needle, sizeof(needle), " for %s from %s port %s ssh2", user, host, port);
	FILE *f = fopen("/var/log/auth.log", "r");
	pid_t pid = 0;
	if (!f)
		return 0;
	while (fgets(buf, sizeof(buf), f)) {
		char *accepted = strstr(buf, "]: Accepted ");
		char *tag = strstr(buf, " sshd[");
		if (accepted && tag && tag < accepted && strstr(accepted, needle))
			pid = (pid_t)atoi(tag + 6);
	}
	fclose(f);
	return pid;
}

/* The end of a connection (sshd's lines for a client that closed it), under the pid of its login. */
static int log_close(const char *user, const char *host, const char *port)
{
	static char ident[32];
	pid_t pid = accepted_pid(user, host, port);
	snprintf(ident, sizeof(ident), "sshd[%d]", pid > 0 ? (int)pid : (int)getpid());
	openlog(ident, 0, LOG_AUTH);
	syslog(LOG_INFO, "Received disconnect from %s port %s:11: disconnected by user", host, port);
	syslog(LOG_INFO, "Disconnected from user %s %s port %s", user, host, port);
	syslog(LOG_INFO, "pam_unix(sshd:session): session closed for user %s", user);
	closelog();
	return 0;
}

/* pam_systemd's runtime directory: /run/user/UID, 0700, the user's (made when missing). */
static void runtime_dir(uid_t uid, gid_t gid)
{
	char dir[64];
	mkdir("/run/user", 0755);
	snprintf(dir, sizeof(dir), "/run/user/%u", (unsigned)uid);
	if (mkdir(dir, 0700) == 0 && lchown(dir, uid, gid) != 0)
		(void)0;
}

/* Whether every hierarchy that holds a login's scope (the named systemd one, pids, the unified one: the
 * caller moves those first, in that order) shows this process in a user.slice. */
static int scoped(char *text)
{
	int wanted = 0;
	for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
		char *ctrl = strchr(line, ':');
		char *path = ctrl ? strchr(ctrl + 1, ':') : NULL;
		if (!path)
			continue;
		*path++ = '\0';
		ctrl++;
		if (strcmp(ctrl, "name=systemd") == 0 || strcmp(ctrl, "pids") == 0 || strcmp(ctrl, "") == 0) {
			wanted++;
			if (strncmp(path, "/user.slice/", 12) != 0)
				return 0;
		}
	}
	return wanted > 0;
}

/* -s: the caller moves this process into its login's session scope from the host (pam_systemd's job).
 * Wait for that before anything forks, so the shell and the command start inside it: at most 250 ms,
 * and a session whose move does not come carries on where it is. */
static void wait_for_scope(void)
{
	const struct timespec ms = {0, 1000 * 1000};
	char buf[4096];
	for (int i = 0; i < 250; i++) {
		int fd = open("/proc/self/cgroup", O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			return;
		ssize_t n = read(fd, buf, sizeof(buf) - 1);
		close(fd);
		if (n <= 0)
			return;
		buf[n] = '\0';
		if (scoped(buf))
			return;
		nanosleep(&ms, NULL);
	}
}

/* The open-files limits a session starts with are the box's (PID 1 has them from the engine's spec, as a
 * login gets systemd's DefaultLimitNOFILE): an engine exec sometimes arrives with its soft limit raised to
 * the hard one (the Go runtime of the engine's helpers raises its own), which `ulimit -n` would show.
 * systemd as PID 1 (sandbox.init: systemd) raises its own soft limit to the hard one but starts ssh.service
 * with DefaultLimitNOFILE's soft 1024: that is the session's. */
static void box_nofile_limit(void)
{
	unsigned long long soft = 0, hard = 0;
	char comm[16] = "";
	FILE *f = fopen("/proc/1/comm", "r");
	if (f) {
		if (!fgets(comm, sizeof(comm), f))
			comm[0] = '\0';
		fclose(f);
	}
	if (strcmp(comm, "systemd\n") == 0) {
		soft = 1024;
	} else {
		f = fopen("/proc/1/limits", "r");
		if (!f)
			return;
		char line[256];
		while (fgets(line, sizeof(line), f))
			if (sscanf(line, "Max open files %llu %llu", &soft, &hard) == 2)
				break;
		fclose(f);
	}
	struct rlimit now;
	if (soft == 0 || getrlimit(RLIMIT_NOFILE, &now) != 0 || now.rlim_cur == soft || soft > now.rlim_max)
		return;
	now.rlim_cur = soft;
	setrlimit(RLIMIT_NOFILE, &now);
}

#define MAX_FAILED 32

int main(int argc, char **argv)
{
	const char *failed[MAX_FAILED];
	int nfailed = 0, closing = 0, scope = 0, opt;
	while ((opt = getopt(argc, argv, "+f:xs")) != -1) {
		if (opt == 'f' && nfailed < MAX_FAILED)
			failed[nfailed++] = strdup(optarg);
		else if (opt == 'x')
			closing = 1;
		else if (opt == 's')
			scope = 1;
		else if (opt != 'f')
			return 255;
	}
	if (argc - optind < 4) {
		fprintf(stderr, "usage\n");
		return 255;
	}
	char **args = argv + optind;
	if (closing)
		return log_close(args[0], args[1], args[2]);
	if (scope)
		wait_for_scope();
	box_nofile_limit();
	/* Copies: set_title() later overwrites the argument area these point into. */
	const char *user = strdup(args[0]), *host = strdup(args[1]), *port = strdup(args[2]);
	const char *method = strdup(args[3]);
	const char *command = argc - optind > 4 ? strdup(args[4]) : NULL;
	struct passwd *pw = find_user(user);
	if (!pw) {
		fprintf(stderr, "no such user\n");
		return 255;
	}
	char *home = strdup(pw->pw_dir), *shell = strdup(pw->pw_shell[0] ? pw->pw_shell : "/bin/sh");
	uid_t uid = pw->pw_uid;
	gid_t gid = pw->pw_gid;

	/* As sshd: any terminal gets a pts session (utmp, SSH_TTY, "user@pts/N"); only a terminal
	 * without a command gets the login banner (uname, motd, "Last login"). */
	const char *tty = isatty(0) ? ttyname(0) : NULL;
	int interactive = tty != NULL && command == NULL;
	const char *line = tty && strncmp(tty, "/dev/", 5) == 0 ? tty + 5 : "notty";
	char title[128];
	snprintf(title, sizeof(title), "sshd: %s@%s", user, tty ? line : "notty");

	openlog("sshd", LOG_PID, LOG_AUTH);
	struct utmpx ut;
	/* sshd logs a connection's login once (the first channel's), with or without a terminal; only a
	 * terminal gets utmp and a banner. */
	if (strcmp(method, "-") != 0) {
		for (int i = 0; i < nfailed; i++)
			log_failure(failed[i], host, port);
		syslog(LOG_INFO, "Accepted %s for %s from %s port %s ssh2", method, user, host, port);
		syslog(LOG_INFO, "pam_unix(sshd:session): session opened for user %s(uid=%u) by (uid=0)", user,
		       (unsigned)uid);
	}
	runtime_dir(uid, gid);
	/* The login uid (pam_loginuid's job): `last` and audit look for it; settable once while unset. */
	int lfd = open("/proc/self/loginuid", O_WRONLY | O_CLOEXEC);
	if (lfd >= 0) {
		char uidbuf[16];
		int n = snprintf(uidbuf, sizeof(uidbuf), "%u", (unsigned)uid);
		if (write(lfd, uidbuf, (size_t)n) != n)
			(void)0;
		close(lfd);
	}
	if (interactive)
		motd();
	if (tty) {
		if (interactive)
			lastlog(uid, line, host);
		fflush(stdout);
		fill_utmp(&ut, USER_PROCESS, line, user, host);
		write_utmp(&ut);
		if (chown(tty, uid, 5) != 0) /* group tty, as sshd leaves the pty */
			(void)0;
		chmod(tty, 0620);
	}

	child = fork();
	if (child < 0)
		return 255;
	if (child == 0) {
		closelog();
		if (set_groups(user, gid) != 0 || setgid(gid) != 0 || setuid(uid) != 0) {
			fprintf(stderr, "cannot change to user %s\n", user);
			_exit(255);
		}
		if (chdir(home) != 0) {
			fprintf(stderr, "Could not chdir to home directory %s: %s\n", home, strerror(errno));
			if (chdir("/") != 0)
				_exit(255);
		}
		if (tty)
			setenv("SSH_TTY", tty, 1);
		const char *base = strrchr(shell, '/') ? strrchr(shell, '/') + 1 : shell;
		if (command) {
			execl(shell, base, "-c", command, (char *)NULL);
		} else {
			char dash[256];
			snprintf(dash, sizeof(dash), "-%s", base); /* a login shell, as sshd starts it */
			execl(shell, dash, (char *)NULL);
		}
		fprintf(stderr, "%s: %s\n", shell, strerror(errno));
		_exit(127);
	}

	set_title(argc, argv, title);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = forward;
	sigaction(SIGHUP, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGINT, SIG_IGN);
	signal(SIGQUIT, SIG_IGN);
	signal(SIGTSTP, SIG_IGN);
	signal(SIGTTOU, SIG_IGN);

	int status = 0;
	while (waitpid(child, &status, 0) < 0 && errno == EINTR)
		;
	if (tty) {
		fill_utmp(&ut, DEAD_PROCESS, line, NULL, NULL);
		write_utmp(&ut);
	}
	closelog(); /* "session closed": once, when the connection ends (-x) */
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}
