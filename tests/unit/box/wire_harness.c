/* Drives the box's wire.c for tests/unit/box/test_protocol.py: one command a run, its result on stdout.
 *   request           parse stdin as one request packet: "refused WHY", or the fields (strings in hex)
 *   started PID       the 'O' reply's bytes, in hex
 *   exited STATUS     the 'X' reply's bytes, in hex
 *   failed TEXT       the 'E' reply's bytes, in hex
 *   signal HEX        the signal a host message asks for (0: none)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

static void hex(const char *label, const void *data, size_t n)
{
	const unsigned char *p = data;
	printf("%s ", label);
	for (size_t i = 0; i < n; i++)
		printf("%02x", p[i]);
	printf("\n");
}

static int request(void)
{
	static unsigned char req[MAX_REQUEST + 1]; /* as the listener receives: a larger packet is cut to this */
	static char *strings[MAX_STRINGS + 4];
	size_t n = fread(req, 1, sizeof(req), stdin);
	struct request r;
	const char *bad = parse_request(req, n, strings, &r);
	if (bad) {
		printf("refused %s\n", bad);
		return 0;
	}
	printf("tty %d\nrelay %d\ncols %u\nrows %u\nargc %d\nenvc %d\n", r.tty, r.relay, r.cols, r.rows, r.argc, r.envc);
	hex("user", r.user, strlen(r.user));
	hex("workdir", r.workdir, strlen(r.workdir));
	if (r.peer)
		hex("peer", r.peer, strlen(r.peer));
	for (int i = 0; i < r.argc; i++)
		hex("argv", r.argv[i], strlen(r.argv[i]));
	for (int i = 0; i < r.envc; i++)
		hex("env", r.env[i], strlen(r.env[i]));
	printf("terminated %d\n", r.argv[r.argc] == NULL && r.env[r.envc] == NULL);
	return 0;
}

int main(int argc, char **argv)
{
	unsigned char buf[MAX_FAILED_TEXT];
	if (argc == 2 && strcmp(argv[1], "request") == 0)
		return request();
	if (argc != 3)
		return 2;
	if (strcmp(argv[1], "started") == 0) {
		encode_started(buf, (pid_t)strtol(argv[2], NULL, 0));
		hex("reply", buf, REPLY_PID_SIZE);
	} else if (strcmp(argv[1], "exited") == 0) {
		encode_exited(buf, (int)strtol(argv[2], NULL, 0));
		hex("reply", buf, REPLY_PID_SIZE);
	} else if (strcmp(argv[1], "failed") == 0) {
		size_t n = encode_failed((char *)buf, argv[2]);
		hex("reply", buf, n);
	} else if (strcmp(argv[1], "signal") == 0) {
		size_t n = strlen(argv[2]) / 2;
		for (size_t i = 0; i < n && i < sizeof(buf); i++)
			sscanf(argv[2] + 2 * i, "%2hhx", &buf[i]);
		printf("signal %d\n", parse_signal(buf, (ssize_t)n));
	} else {
		return 2;
	}
	return 0;
}
