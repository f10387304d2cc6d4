/*
 * The session's own TCP connection to :22, between the listener and its workers: relay.c says how.
 */
#ifndef RELAY_H
#define RELAY_H

#include <sys/socket.h>

#include "listener.h" /* MAX_CHILDREN */

struct expectation {
	int ctrl; /* the listener's end of the worker's socketpair; -1 = free slot */
	int armed;
	struct sockaddr_storage peer;
	socklen_t len;
	long long deadline_ms;
};

extern struct expectation expected[MAX_CHILDREN]; /* one slot per worker, the listener's */

/* "ADDR PORT" (IPv4 or IPv6, port 1-65535) as a sockaddr; 0 on success. */
int parse_peer(const char *text, struct sockaddr_storage *out, socklen_t *len);

/* The listener's side. */
int expect_slot(int ctrl);
void expect_free(struct expectation *e);
void expect_read(struct expectation *e);
int expect_expire(void);
int expect_take(int conn, const struct sockaddr_storage *peer);

/* The worker's side: the connection's fd, or -1. */
int relay_accept(int sock, int ctrl, const struct sockaddr_storage *peer, socklen_t len);

#endif
