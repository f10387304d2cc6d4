/*
 * Which listener a re-executed init is (listener.c): sshd's on :22, or inetd's on :23 whose workers are telnetd.
 * The telnet side (inetd.c): what Debian's openbsd-inetd + inetutils-telnetd show for a telnet login.
 */
#ifndef INETD_H
#define INETD_H

#include <sys/socket.h>
#include <sys/types.h>

#define INETD_TITLE "/usr/sbin/inetd" /* ps: what openbsd-inetd's inetd.service starts */
#define TELNET_PORT 23

struct service {
	const char *comm;   /* the listener's name (ps -o comm, ss -p) */
	const char *socket; /* its abstract socket: the host's requests (protocol.h) */
	int port;	    /* its TCP port */
	int telnet;	    /* workers are telnetd's: "telnetd", the connection on fds 0-2, the ".telnet" wtmp record */
};

/* The listener a title names: inetd's for INETD_TITLE, else sshd's. */
const struct service *service_for(const char *title);

/* How telnetd names its peer for login -h and wtmp: "localhost" for 127.0.0.1 and ::1 (the box's /etc/hosts),
 * else the address (the box resolves nothing else). */
void telnet_host(const struct sockaddr_storage *peer, char *out, size_t len);

/* In the login's process, before it execs login: the LOGIN_PROCESS record inetutils' telnetd writes for the
 * pty (utmp and wtmp, user ".telnet"), which login then takes over (it finds the record by its pid). */
void telnet_utmp(const char *slave, const char *host);

/* A connection to :23 no session announced (a client in the box): served as inetd would, by tcpd and
 * telnetd if installed; else it is closed. Never returns. */
void telnet_inetd_exec(void) __attribute__((noreturn));

#endif
