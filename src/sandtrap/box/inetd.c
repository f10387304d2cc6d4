/*
 * The telnet side of the box's listener (inetd.h): a second instance of listener.c, titled "/usr/sbin/inetd",
 * that listens on :23 and serves the host's telnet logins, as Debian's openbsd-inetd + inetutils-telnetd show one:
 *
 *   /usr/sbin/inetd            (PID 1's child; LISTEN 0.0.0.0:23 and [::]:23)
 *    \_ telnetd                (the login's TCP connection on fds 0, 1, 2)
 *        \_ /bin/login ...     (LOGIN_PROCESS ".telnet" in utmp/wtmp, then login's own USER_PROCESS)
 *            \_ -bash
 *
 * PID 1 starts it when the host asks (SIGUSR2, see PROTOCOL.md): only boxes of a sensor with a telnet service
 * have it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>
#include <utmpx.h>

#include "inetd.h"
#include "protocol.h" /* BOX_SOCKET, INETD_SOCKET */

static const struct service sshd = {"sshd", BOX_SOCKET, 22, 0};
static const struct service inetd = {"inetd", INETD_SOCKET, TELNET_PORT, 1};

const struct service *service_for(const char *title)
{
	return title && strcmp(title, INETD_TITLE) == 0 ? &inetd : &sshd;
}

void telnet_host(const struct sockaddr_storage *peer, char *out, size_t len)
{
	if (peer->ss_family == AF_INET) {
		const struct sockaddr_in *v4 = (const void *)peer;
		if (v4->sin_addr.s_addr == htonl(INADDR_LOOPBACK))
			snprintf(out, len, "localhost");
		else if (!inet_ntop(AF_INET, &v4->sin_addr, out, (socklen_t)len))
			out[0] = 0;
		return;
	}
	const struct sockaddr_in6 *v6 = (const void *)peer;
	if (peer->ss_family == AF_INET6 && IN6_IS_ADDR_LOOPBACK(&v6->sin6_addr))
		snprintf(out, len, "localhost");
	else if (peer->ss_family != AF_INET6 || !inet_ntop(AF_INET6, &v6->sin6_addr, out, (socklen_t)len))
		out[0] = 0;
}

void telnet_utmp(const char *slave, const char *host)
{
	if (!slave || strncmp(slave, "/dev/", 5) != 0)
		return;
	const char *line = slave + 5;
	size_t n = strlen(line);
	struct utmpx ut;
	struct timeval tv;
	memset(&ut, 0, sizeof(ut));
	ut.ut_type = LOGIN_PROCESS;
	ut.ut_pid = getpid();
	strncpy(ut.ut_line, line, sizeof(ut.ut_line) - 1);
	/* "tn" and the line's last two characters: pts/0 -> "tn/0", as telnetd's record shows */
	ut.ut_id[0] = 't';
	ut.ut_id[1] = 'n';
	memcpy(ut.ut_id + 2, n >= 2 ? line + n - 2 : line, n >= 2 ? 2 : n);
	strncpy(ut.ut_user, ".telnet", sizeof(ut.ut_user) - 1);
	strncpy(ut.ut_host, host, sizeof(ut.ut_host) - 1);
	gettimeofday(&tv, NULL);
	ut.ut_tv.tv_sec = tv.tv_sec;
	ut.ut_tv.tv_usec = tv.tv_usec;
	setutxent();
	pututxline(&ut);
	endutxent();
	updwtmpx("/var/log/wtmp", &ut);
}

void telnet_inetd_exec(void)
{
	/* inetd.conf's line: telnet stream tcp nowait root /usr/sbin/tcpd /usr/sbin/telnetd */
	static char *const tcpd[] = {"/usr/sbin/telnetd", NULL};
	static char *const telnetd[] = {"telnetd", NULL};
	if (access("/usr/sbin/tcpd", X_OK) == 0 && access(tcpd[0], X_OK) == 0)
		execv("/usr/sbin/tcpd", tcpd);
	if (access(tcpd[0], X_OK) == 0)
		execv(tcpd[0], telnetd);
	_exit(1); /* not installed: the connection closes */
}
