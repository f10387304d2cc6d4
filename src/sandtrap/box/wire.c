/* The box's side of the wire protocol (wire.h, PROTOCOL.md). */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "wire.h"

static uint16_t u16(const unsigned char *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static void u32(unsigned char *out, uint32_t v)
{
	out[0] = (unsigned char)v;
	out[1] = (unsigned char)(v >> 8);
	out[2] = (unsigned char)(v >> 16);
	out[3] = (unsigned char)(v >> 24);
}

const char *parse_request(unsigned char *req, size_t n, char **strings, struct request *out)
{
	if (n < REQUEST_HEADER_SIZE + 2 || n > MAX_REQUEST || memcmp(req, REQUEST_MAGIC, REQUEST_MAGIC_SIZE) != 0)
		return "bad request";
	memset(out, 0, sizeof(*out));
	out->tty = req[REQUEST_FLAGS_AT] & REQUEST_TTY;
	out->relay = (req[REQUEST_FLAGS_AT] & REQUEST_RELAY) != 0;
	out->cols = u16(req + REQUEST_COLS_AT);
	out->rows = u16(req + REQUEST_ROWS_AT);
	out->argc = u16(req + REQUEST_ARGC_AT);
	out->envc = u16(req + REQUEST_ENVC_AT);
	if (out->argc < 1 || out->argc + out->envc > MAX_STRINGS)
		return "bad counts";
	int want = out->argc + out->envc + 2 + out->relay, got = 0;
	char *s = (char *)req + REQUEST_HEADER_SIZE, *end = (char *)req + n;
	while (s < end && got < want) {
		char *nul = memchr(s, 0, (size_t)(end - s));
		if (!nul)
			break;
		strings[got++] = s;
		s = nul + 1;
	}
	if (got != want || s != end)
		return "bad strings";
	out->user = strings[0];
	out->workdir = strings[1];
	out->peer = out->relay ? strings[2] : NULL;
	out->argv = strings + 2 + out->relay;
	out->env = strings + 2 + out->relay + out->argc + 1;
	/* argv and env as NULL-terminated arrays: shift env up one slot to make room for argv's NULL. */
	memmove(out->env, out->env - 1, sizeof(char *) * (size_t)out->envc);
	out->argv[out->argc] = NULL;
	out->env[out->envc] = NULL;
	return NULL;
}

void encode_started(unsigned char *out, pid_t pid)
{
	out[0] = REPLY_STARTED;
	u32(out + 1, (uint32_t)pid);
}

void encode_exited(unsigned char *out, int status)
{
	out[0] = REPLY_EXITED;
	u32(out + 1, (uint32_t)status);
}

size_t encode_failed(char *out, const char *why)
{
	int n = snprintf(out, MAX_FAILED_TEXT, "%c%s", REPLY_FAILED, why);
	return n < 0 ? 0 : (size_t)n < MAX_FAILED_TEXT ? (size_t)n : MAX_FAILED_TEXT - 1;
}

int parse_signal(const unsigned char *msg, ssize_t n)
{
	return n == 2 && msg[0] == SEND_SIGNAL && msg[1] > 0 && msg[1] <= MAX_SIGNAL ? msg[1] : 0;
}

int send_msg(int sock, const void *data, size_t len, const int *fds, int nfds)
{
	struct iovec iov = {(void *)data, len};
	union {
		char buf[CMSG_SPACE(sizeof(int) * MAX_REPLY_FDS)];
		struct cmsghdr align;
	} u;
	if (nfds > MAX_REPLY_FDS)
		return -1;
	struct msghdr msg = {0};
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	if (nfds > 0) {
		memset(&u, 0, sizeof(u));
		msg.msg_control = u.buf;
		msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
	}
	return sendmsg(sock, &msg, MSG_NOSIGNAL) == (ssize_t)len ? 0 : -1;
}
