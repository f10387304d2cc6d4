/*
 * The box's side of the host<->box wire protocol (PROTOCOL.md): the request parsed, the replies encoded, a
 * packet sent with its fds. The listener and its workers use it; a unit test compiles wire.c on its own and
 * checks it against the host's encoder and parser.
 */
#ifndef WIRE_H
#define WIRE_H

#include <stddef.h>
#include <sys/types.h>

#include "protocol.h"

#define REPLY_PID_SIZE 5 /* 'O' or 'X' and a u32 */

struct request {
	int tty, relay;
	unsigned short cols, rows;
	int argc, envc;
	const char *user, *workdir; /* workdir "" = the user's home */
	const char *peer;           /* "ADDR PORT" with REQUEST_RELAY, else NULL */
	char **argv, **env;         /* NULL-terminated, into the request's own bytes */
};

/* The request in ``req`` (``n`` bytes, as received; its strings stay in it), with ``strings`` (room for
 * MAX_STRINGS + 4 pointers) holding argv and env. Returns NULL, or why it is refused (the 'E' reply's text). */
const char *parse_request(unsigned char *req, size_t n, char **strings, struct request *out);

/* 'O' + pid, 'X' + wait status: REPLY_PID_SIZE bytes into ``out``. */
void encode_started(unsigned char *out, pid_t pid);
void encode_exited(unsigned char *out, int status);

/* 'E' + ``why`` (cut to fit MAX_FAILED_TEXT bytes in all) into ``out``; returns its length. */
size_t encode_failed(char *out, const char *why);

/* The signal a host's message asks for (1..MAX_SIGNAL), or 0 if it is not a signal message. */
int parse_signal(const unsigned char *msg, ssize_t n);

/* One packet of ``len`` bytes with ``nfds`` (0..MAX_REPLY_FDS) fds (SCM_RIGHTS), MSG_NOSIGNAL; 0 if sent whole. */
int send_msg(int sock, const void *data, size_t len, const int *fds, int nfds);

#endif
