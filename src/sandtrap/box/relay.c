/*
 * The session's own TCP connection to :22 (relay.h; linked into init with listener.c).
 *
 * On a real server the attacker's connection ends at sshd: `ss -tnp` in the box shows it, server end :22,
 * held by "sshd: USER [priv]". Here the attacker's SSH ends at the host, so the host makes a TCP
 * connection of its own to the box's :22 from the attacker's address and port (broker.py: inside the box's
 * network namespace for a 127/8 attacker, else an IP_TRANSPARENT socket on the host) and the login's worker
 * holds the server end until the session ends. The listener must tell that connection apart from genuine
 * in-box connections to :22 (those still go to `sshd -i`):
 *
 *  - the host's request names the peer to expect (flag REQUEST_RELAY, see PROTOCOL.md);
 *  - the worker announces it to the listener over a socketpair made at its fork ('P' + the sockaddr), then
 *    tells the host to connect ('R');
 *  - the listener matches each accepted connection's peer against the announced ones: a match goes to that
 *    worker ('F' with the socket, SCM_RIGHTS), anything else to `sshd -i` as before;
 *  - an expectation lasts EXPECT_TIMEOUT_MS, then is dropped; the worker waits RELAY_WAIT_MS at most and
 *    starts the session without the connection if none came (the session never fails because of it).
 *
 * Only the host can create an expectation: the abstract socket refuses peers of the box's own pid namespace.
 * A process in the box that connects from the expected address and port first (it can read them in
 * SSH_CONNECTION, but must bind them within the few milliseconds between the 'P' and the host's connect)
 * only gets its own connection held, unread, by the worker; the host's connect then fails on the taken
 * address and the session goes on without its connection. Nothing is read from or written to the socket.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "protocol.h" /* EXPECT_TIMEOUT_MS, RELAY_WAIT_MS, REPLY_CONNECT, REPLY_NO_RELAY */
#include "relay.h"
#include "wire.h" /* send_msg */

struct expectation expected[MAX_CHILDREN];

static long long now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* "ADDR PORT" (IPv4 or IPv6, port 1-65535) as a sockaddr; 0 on success. */
int parse_peer(const char *text, struct sockaddr_storage *out, socklen_t *len)
{
	char addr[INET6_ADDRSTRLEN + 1];
	const char *sp = strchr(text, ' ');
	if (!sp || sp == text || (size_t)(sp - text) >= sizeof(addr))
		return -1;
	memcpy(addr, text, (size_t)(sp - text));
	addr[sp - text] = 0;
	char *end;
	errno = 0;
	unsigned long port = strtoul(sp + 1, &end, 10);
	if (errno || *end || end == sp + 1 || sp[1] < '1' || sp[1] > '9' || port < 1 || port > 65535)
		return -1;
	memset(out, 0, sizeof(*out));
	struct sockaddr_in *v4 = (struct sockaddr_in *)out;
	struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)out;
	if (inet_pton(AF_INET, addr, &v4->sin_addr) == 1) {
		v4->sin_family = AF_INET;
		v4->sin_port = htons((uint16_t)port);
		*len = sizeof(*v4);
		return 0;
	}
	if (inet_pton(AF_INET6, addr, &v6->sin6_addr) == 1) {
		v6->sin6_family = AF_INET6;
		v6->sin6_port = htons((uint16_t)port);
		*len = sizeof(*v6);
		return 0;
	}
	return -1;
}

static int same_peer(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
	if (a->ss_family != b->ss_family)
		return 0;
	if (a->ss_family == AF_INET) {
		const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
		return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
	}
	const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
	return a->ss_family == AF_INET6 && x->sin6_port == y->sin6_port &&
	       memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
}

/* --- the listener's side ------------------------------------------------------------------------- */

/* A slot for a new worker's socketpair end; -1 if all are taken (the worker then runs without one). */
int expect_slot(int ctrl)
{
	for (int i = 0; i < MAX_CHILDREN; i++)
		if (expected[i].ctrl < 0) {
			memset(&expected[i], 0, sizeof(expected[i]));
			expected[i].ctrl = ctrl;
			return i;
		}
	return -1;
}

void expect_free(struct expectation *e)
{
	close(e->ctrl);
	e->ctrl = -1;
	e->armed = 0;
}

/* What a worker said: its expectation ('P' + sockaddr), or its end closed. Never blocks. */
void expect_read(struct expectation *e)
{
	for (;;) {
		unsigned char msg[1 + sizeof(struct sockaddr_storage)];
		ssize_t n = recv(e->ctrl, msg, sizeof(msg), MSG_DONTWAIT);
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		if (n <= 0) {
			expect_free(e);
			return;
		}
		if (msg[0] != 'P' || ((size_t)n != 1 + sizeof(struct sockaddr_in) && (size_t)n != 1 + sizeof(struct sockaddr_in6)))
			continue;
		memset(&e->peer, 0, sizeof(e->peer));
		memcpy(&e->peer, msg + 1, (size_t)n - 1);
		e->len = (socklen_t)(n - 1);
		e->armed = 1;
		e->deadline_ms = now_ms() + EXPECT_TIMEOUT_MS;
	}
}

static void expect_read_all(void)
{
	for (int i = 0; i < MAX_CHILDREN; i++)
		if (expected[i].ctrl >= 0)
			expect_read(&expected[i]);
}

/* Expectations past their time dropped; the poll timeout until the next one lapses (-1: none). */
int expect_expire(void)
{
	long long now = now_ms(), next = -1;
	for (int i = 0; i < MAX_CHILDREN; i++) {
		struct expectation *e = &expected[i];
		if (e->ctrl < 0 || !e->armed)
			continue;
		if (e->deadline_ms <= now)
			e->armed = 0;
		else if (next < 0 || e->deadline_ms - now < next)
			next = e->deadline_ms - now;
	}
	return (int)next;
}

/* An accepted connection from an expected peer goes to its worker (1: taken, the caller closes its copy). */
int expect_take(int conn, const struct sockaddr_storage *peer)
{
	for (int pass = 0; pass < 2; pass++) {
		for (int i = 0; i < MAX_CHILDREN; i++) {
			struct expectation *e = &expected[i];
			if (e->ctrl < 0 || !e->armed || !same_peer(&e->peer, peer))
				continue;
			e->armed = 0;
			return send_msg(e->ctrl, "F", 1, &conn, 1) == 0;
		}
		/* Not (yet) known: the worker's 'P' is queued before its 'R' reaches the host, so it is read now. */
		expect_read_all();
	}
	return 0;
}

/* --- the worker's side --------------------------------------------------------------------------- */

/* Announce the peer, tell the host to connect, wait for the listener to pass the connection on: its fd, or
 * -1 (none in time, or the host said it could not connect). The host hanging up ends the worker. */
int relay_accept(int sock, int ctrl, const struct sockaddr_storage *peer, socklen_t len)
{
	unsigned char msg[1 + sizeof(struct sockaddr_storage)];
	msg[0] = 'P';
	memcpy(msg + 1, peer, len);
	if (ctrl < 0 || send(ctrl, msg, 1 + (size_t)len, MSG_NOSIGNAL) != (ssize_t)(1 + len)) {
		send_msg(sock, (const char[]){REPLY_NO_RELAY}, 1, NULL, 0); /* no relay: the host does not connect */
		return -1;
	}
	if (send_msg(sock, (const char[]){REPLY_CONNECT}, 1, NULL, 0) != 0)
		_exit(1);
	long long deadline = now_ms() + RELAY_WAIT_MS;
	for (;;) {
		long long left = deadline - now_ms();
		if (left <= 0)
			return -1;
		struct pollfd p[2] = {{ctrl, POLLIN, 0}, {sock, POLLIN, 0}};
		if (poll(p, 2, (int)left) < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (p[1].revents) {
			unsigned char m[16];
			ssize_t n = recv(sock, m, sizeof(m), MSG_DONTWAIT);
			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
				_exit(0); /* the host gave up: start nothing */
			if (n == 1 && m[0] == REPLY_NO_RELAY)
				return -1;
		}
		if (p[0].revents) {
			char c = 0;
			struct iovec iov = {&c, 1};
			union {
				char buf[CMSG_SPACE(sizeof(int))];
				struct cmsghdr align;
			} u;
			struct msghdr mh = {0};
			mh.msg_iov = &iov;
			mh.msg_iovlen = 1;
			mh.msg_control = u.buf;
			mh.msg_controllen = sizeof(u.buf);
			ssize_t n = recvmsg(ctrl, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
				return -1;
			struct cmsghdr *cm = n > 0 ? CMSG_FIRSTHDR(&mh) : NULL;
			if (cm && cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS &&
			    cm->cmsg_len == CMSG_LEN(sizeof(int)) && c == 'F') {
				int fd;
				memcpy(&fd, CMSG_DATA(cm), sizeof(fd));
				return fd;
			}
		}
	}
}
