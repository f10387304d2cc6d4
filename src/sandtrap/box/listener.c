/*
 * The box's SSH listener, linked into init (listener.h: one static binary). PID 1
 * forks it and re-executes itself with argv[0] = LISTENER_TITLE, so ps shows what sshd's listener
 * shows. It serves two sockets and stays a small poll loop that never blocks:
 *
 *  - TCP port 22 (IPv4 and IPv6): each connection is handed to `/usr/sbin/sshd -i` (inetd mode), so
 *    the box's own sshd still answers anyone who connects to it from inside; except the one a session
 *    request announced (its peer address and port): that one goes to the session's worker, which holds
 *    it while the session lasts, so `ss -tnp` shows the login's connection as on a server (relay.c).
 *  - an abstract unix socket (BOX_SOCKET; per network namespace: no file the host has to
 *    traverse, nothing in /proc/mounts): the host's session requests (session_transport:
 *    init). Only a peer outside the box's pid namespace is served: SO_PEERCRED reports pid 0 for it,
 *    while anything started in the box has a pid here. Others are closed at once, without a fork.
 *
 * A session request is served by a worker forked per connection, titled "sshd: USER [priv]" like
 * sshd's monitor, so a login's chain is listener -> "sshd: USER [priv]" -> "sshd: USER@pts/N"
 * (session.c) -> "-bash", and no session process has parent 0.
 *
 * The protocol on the abstract socket (request, 'R'/'N', 'O' with the fds, 'X', 'E', 'K', the hang-up) is
 * described in PROTOCOL.md; its constants are protocol.h's, the request's parsing and the replies' encoding
 * wire.c's.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "accounts.h"
#include "inetd.h" /* sshd's listener or inetd's (telnet) */
#include "listener.h"
#include "protocol.h"
#include "relay.h" /* the session's TCP connection to :22 */
#include "wire.h"

static int title_room;
static char *title_start;
static const struct service *svc; /* which listener this is: sshd's or inetd's (inetd.h) */

static void retitle(const char *title, const char *comm)
{
	if (!title_start)
		return;
	memset(title_start, 0, (size_t)title_room);
	strncpy(title_start, title, (size_t)title_room - 1);
	prctl(PR_SET_NAME, comm, 0, 0, 0);
}

static void null_stdio(void)
{
	int null = open("/dev/null", O_RDWR);
	if (null < 0)
		return;
	dup2(null, 0);
	dup2(null, 1);
	dup2(null, 2);
	if (null > 2)
		close(null);
}

/* --- a worker: one session request ------------------------------------------------------------- */

static void fail(int sock, const char *why)
{
	char buf[MAX_FAILED_TEXT];
	send_msg(sock, buf, encode_failed(buf, why), NULL, 0);
	_exit(1);
}

static void relay_and_wait(int sock, int sfd, pid_t pid, int master, int pipe_out);

/* ``ctrl``: this worker's end of its socketpair with the listener (-1: none), for the relay's connection. */
static void serve_request(int sock, int ctrl)
{
	static unsigned char req[MAX_REQUEST + 1];
	static char *strings[MAX_STRINGS + 4];
	struct pollfd p = {sock, POLLIN, 0};
	if (poll(&p, 1, REQUEST_TIMEOUT_MS) != 1)
		_exit(1);
	ssize_t n = recv(sock, req, sizeof(req), MSG_DONTWAIT);
	struct request r;
	const char *bad = n < 0 ? "bad request" : parse_request(req, (size_t)n, strings, &r);
	if (bad)
		fail(sock, bad);
	int tty = r.tty, relay = r.relay;
	struct winsize ws = {r.rows, r.cols, 0, 0};
	const char *user = r.user, *workdir = r.workdir;
	struct sockaddr_storage peer;
	socklen_t peer_len = 0;
	if (relay && parse_peer(r.peer, &peer, &peer_len) != 0)
		fail(sock, "bad peer");
	char **argv = r.argv, **env = r.env;

	/* The host gave up meanwhile (a time-out): start nothing. */
	struct pollfd gone = {sock, POLLRDHUP, 0};
	if (poll(&gone, 1, 0) == 1 && (gone.revents & (POLLHUP | POLLRDHUP | POLLERR)))
		_exit(0);
	struct passwd *pw = find_user(user[0] ? user : "root");
	if (!pw)
		fail(sock, "unknown user");
	uid_t uid = pw->pw_uid;
	gid_t gid = pw->pw_gid;
	char name[64], home[256];
	snprintf(name, sizeof(name), "%s", pw->pw_name);
	snprintf(home, sizeof(home), "%s", pw->pw_dir);
	char title[96], host[64] = "";
	snprintf(title, sizeof(title), "sshd: %s [priv]", name);
	retitle(svc->telnet ? "telnetd" : title, svc->telnet ? "telnetd" : "sshd");
	/* The session's connection (relay.c): held here, by "sshd: USER [priv]", until the session ends (CLOEXEC:
	 * the session's processes do not inherit it, as sshd's do not). telnetd holds it on its fds 0, 1 and 2. */
	int held = -1; /* never closed: it goes when this worker exits */
	if (relay)
		held = relay_accept(sock, ctrl, &peer, peer_len);
	if (relay && svc->telnet)
		telnet_host(&peer, host, sizeof(host));
	if (held > 2 && svc->telnet) {
		dup2(held, 0); /* not inherited all the same: the session's child puts its pty there */
		dup2(held, 1);
		dup2(held, 2);
		close(held);
	}
	if (ctrl >= 0)
		close(ctrl);

	int mine[3] = {-1, -1, -1}, theirs[3] = {-1, -1, -1}, out[2] = {-1, -1}, nfds;
	if (tty) {
		mine[0] = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (mine[0] < 0 || grantpt(mine[0]) != 0 || unlockpt(mine[0]) != 0)
			fail(sock, "no pty");
		char *slave = ptsname(mine[0]);
		theirs[0] = slave ? open(slave, O_RDWR | O_NOCTTY | O_CLOEXEC) : -1;
		if (theirs[0] < 0)
			fail(sock, "no pty");
		if (ws.ws_col && ws.ws_row)
			ioctl(mine[0], TIOCSWINSZ, &ws);
		/* The pty's output reaches the host through a pipe this worker fills (as sshd's session
		 * process copies it): a pty buffers a few KiB only, a pipe 1 MiB, so the host reads big chunks. */
		if (pipe2(out, O_CLOEXEC) != 0)
			fail(sock, "no pipes");
		fcntl(out[1], F_SETPIPE_SZ, 1 << 20);
		fcntl(out[1], F_SETFL, O_NONBLOCK);
		fcntl(mine[0], F_SETFL, O_NONBLOCK);
		mine[1] = out[0];
		nfds = 2;
	} else {
		int p0[2], p1[2], p2[2];
		if (pipe2(p0, O_CLOEXEC) || pipe2(p1, O_CLOEXEC) || pipe2(p2, O_CLOEXEC))
			fail(sock, "no pipes");
		mine[0] = p0[1], theirs[0] = p0[0];
		mine[1] = p1[0], theirs[1] = p1[1];
		mine[2] = p2[0], theirs[2] = p2[1];
		nfds = 3;
	}

	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);

	pid_t pid = fork();
	if (pid < 0)
		fail(sock, "fork failed");
	if (pid == 0) {
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		for (int sig = 1; sig < 32; sig++)
			if (sig != SIGKILL && sig != SIGSTOP)
				signal(sig, SIG_DFL);
		setsid();
		if (tty) {
			ioctl(theirs[0], TIOCSCTTY, 0);
			dup2(theirs[0], 0);
			dup2(theirs[0], 1);
			dup2(theirs[0], 2);
		} else {
			dup2(theirs[0], 0);
			dup2(theirs[1], 1);
			dup2(theirs[2], 2);
		}
		if (svc->telnet && tty && host[0])
			telnet_utmp(ttyname(0), host);
		(void)!set_groups(name, gid);
		if (setgid(gid) != 0 || setuid(uid) != 0)
			_exit(126);
		if (chdir(workdir[0] ? workdir : home) != 0 && chdir("/") != 0)
			_exit(126);
		/* As `docker exec` does: argv[0] looked up in PATH (the request's, else a default). */
		if (!getenv("PATH"))
			setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
		execvpe(argv[0], argv, env);
		_exit(errno == ENOENT ? 127 : 126);
	}
	for (int i = 0; i < 3; i++)
		if (theirs[i] >= 0)
			close(theirs[i]);
	unsigned char started[REPLY_PID_SIZE];
	encode_started(started, pid);
	if (send_msg(sock, started, sizeof(started), mine, nfds) != 0) {
		kill(-pid, SIGKILL);
		kill(pid, SIGKILL);
	}
	int master = tty ? mine[0] : -1; /* kept (tty): this worker copies its output into out[1] */
	for (int i = tty ? 1 : 0; i < 3; i++)
		if (mine[i] >= 0)
			close(mine[i]);
	relay_and_wait(sock, sfd, pid, master, out[1]);
}

/* Until the child ends (its wait status goes to the host) and, with a pty, until its output has all been
 * copied (every slave closed: EIO): signals from the host; its end closed = hang up the session. */
static void relay_and_wait(int sock, int sfd, pid_t pid, int master, int pipe_out)
{
	static char buf[65536];
	size_t have = 0, off = 0;
	int exited = 0, hung_up = 0;
	for (;;) {
		if (exited && master < 0)
			_exit(0);
		struct pollfd fds[4] = {{sfd, POLLIN, 0},
					{hung_up ? -1 : sock, POLLIN, 0},
					{master >= 0 && have == 0 ? master : -1, POLLIN, 0},
					{master >= 0 && have > 0 ? pipe_out : -1, POLLOUT, 0}};
		int r = poll(fds, 4, hung_up ? HANGUP_KILL_MS : -1);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			_exit(1);
		}
		if (master >= 0 && (fds[2].revents || fds[3].revents)) {
			if (have == 0) {
				ssize_t n = read(master, buf, sizeof(buf));
				if (n > 0)
					have = (size_t)n, off = 0;
				else if (n == 0 || (errno != EAGAIN && errno != EINTR)) { /* EIO: no slave left */
					close(master);
					close(pipe_out);
					master = pipe_out = -1;
				}
			}
			if (have > 0) {
				ssize_t n = write(pipe_out, buf + off, have);
				if (n > 0)
					off += (size_t)n, have -= (size_t)n;
				else if (n < 0 && errno != EAGAIN && errno != EINTR) { /* the host closed its end */
					close(master);
					close(pipe_out);
					master = pipe_out = -1;
				}
			}
		}
		int status;
		if (!exited && waitpid(pid, &status, WNOHANG) == pid) {
			exited = 1;
			unsigned char msg[REPLY_PID_SIZE];
			encode_exited(msg, status);
			if (!hung_up)
				send_msg(sock, msg, sizeof(msg), NULL, 0);
		}
		if (sfd >= 0 && (fds[0].revents & POLLIN)) {
			struct signalfd_siginfo si;
			while (read(sfd, &si, sizeof(si)) > 0)
				;
		}
		if (r == 0 && hung_up) { /* HANGUP_KILL_MS after the hang-up */
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
			if (exited)
				_exit(0);
			continue;
		}
		if (!hung_up && fds[1].revents) {
			unsigned char msg[16];
			ssize_t m = recv(sock, msg, sizeof(msg), MSG_DONTWAIT);
			int sig = parse_signal(msg, m);
			if (sig) {
				kill(-pid, sig);
				kill(pid, sig);
			} else if (m == 0 || (m < 0 && errno != EAGAIN && errno != EINTR) ||
				   (fds[1].revents & (POLLHUP | POLLERR))) {
				hung_up = 1;
				if (master >= 0) { /* the last master closed: the kernel hangs the terminal up */
					close(master);
					close(pipe_out);
					master = pipe_out = -1;
				}
				kill(-pid, SIGHUP);
				kill(pid, SIGHUP);
				if (exited)
					_exit(0);
			}
		}
		if (sfd < 0 && r > 0 && !fds[1].revents && master < 0) /* no signalfd: poll the child now and then */
			usleep(50000);
	}
}


/* --- the listener ------------------------------------------------------------------------------ */

static int listen_tcp(int family, int port)
{
	int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	int ok;
	if (family == AF_INET6) {
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
		struct sockaddr_in6 a = {0};
		a.sin6_family = AF_INET6;
		a.sin6_port = htons((uint16_t)port);
		a.sin6_addr = in6addr_any;
		ok = bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
	} else {
		struct sockaddr_in a = {0};
		a.sin_family = AF_INET;
		a.sin_port = htons((uint16_t)port);
		a.sin_addr.s_addr = htonl(INADDR_ANY);
		ok = bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
	}
	if (!ok || listen(fd, 128) != 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static int listen_broker(void)
{
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	struct sockaddr_un a = {0};
	a.sun_family = AF_UNIX;
	size_t n = strlen(svc->socket);
	memcpy(a.sun_path + 1, svc->socket, n);
	socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
	if (bind(fd, (struct sockaddr *)&a, len) != 0 || listen(fd, 64) != 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Started by systemd as ssh.service (Debian's Type=notify unit, sandbox.init: systemd): tell it the sockets are
 * bound, as sshd does, and keep $NOTIFY_SOCKET out of what the listener starts. */
static void notify_ready(void)
{
	const char *path = getenv("NOTIFY_SOCKET");
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	size_t n = path ? strlen(path) : 0;
	if (n >= 2 && n < sizeof(addr.sun_path) && (path[0] == '/' || path[0] == '@')) {
		memcpy(addr.sun_path, path, n);
		if (path[0] == '@')
			addr.sun_path[0] = '\0'; /* an abstract socket */
		int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		if (fd >= 0) {
			static const char ready[] = "READY=1";
			(void)!sendto(fd, ready, sizeof(ready) - 1, MSG_NOSIGNAL, (struct sockaddr *)&addr,
				      (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n));
			close(fd);
		}
	}
	unsetenv("NOTIFY_SOCKET");
}

int listener_main(int argc, char **argv)
{
	title_start = argv[0];
	title_room = (int)(argv[argc - 1] + strlen(argv[argc - 1]) - argv[0]) + 1;
	svc = service_for(argv[0]);
	prctl(PR_SET_NAME, svc->comm, 0, 0, 0);
	prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0);
	null_stdio();
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	signal(SIGPIPE, SIG_IGN);
	int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
	int fds[3] = {listen_broker(), listen_tcp(AF_INET, svc->port), listen_tcp(AF_INET6, svc->port)};
	if (fds[0] < 0 && fds[1] < 0)
		return 1; /* nothing to serve: init starts it again later */
	notify_ready();
	int children = 0;
	for (int i = 0; i < MAX_CHILDREN; i++)
		expected[i].ctrl = -1;
	for (;;) {
		struct pollfd p[4 + MAX_CHILDREN] = {
			{fds[0], POLLIN, 0}, {fds[1], POLLIN, 0}, {fds[2], POLLIN, 0}, {sfd, POLLIN, 0}};
		for (int i = 0; i < MAX_CHILDREN; i++)
			p[4 + i] = (struct pollfd){expected[i].ctrl, POLLIN, 0};
		int wait_ms = expect_expire();
		if (sfd < 0 && (wait_ms < 0 || wait_ms > 1000))
			wait_ms = 1000;
		int r = poll(p, 4 + MAX_CHILDREN, wait_ms);
		if (r < 0 && errno != EINTR)
			return 1;
		for (int i = 0; i < MAX_CHILDREN; i++) /* what workers announced comes before what connected */
			if (expected[i].ctrl >= 0 && r > 0 && p[4 + i].revents)
				expect_read(&expected[i]);
		struct signalfd_siginfo si;
		while (sfd >= 0 && read(sfd, &si, sizeof(si)) > 0)
			;
		while (waitpid(-1, NULL, WNOHANG) > 0)
			children--;
		if (children < 0)
			children = 0;
		for (int i = 0; i < 3; i++) {
			if (fds[i] < 0 || !(p[i].revents & POLLIN))
				continue;
			for (int burst = 0; burst < 16; burst++) {
				struct sockaddr_storage from;
				socklen_t from_len = sizeof(from);
				int c = accept4(fds[i], (struct sockaddr *)&from, &from_len, SOCK_CLOEXEC);
				if (c < 0)
					break;
				if (i > 0 && expect_take(c, &from)) {
					close(c); /* the session's worker holds it now */
					continue;
				}
				if (i == 0) {
					struct ucred cred;
					socklen_t len = sizeof(cred);
					if (getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.pid != 0 ||
					    cred.uid != 0) {
						close(c); /* a process of the box itself: not served */
						continue;
					}
				}
				if (children >= MAX_CHILDREN) {
					close(c);
					continue;
				}
				/* A worker's line to this listener, for the connection its session expects (relay.c). */
				int pair[2] = {-1, -1}, slot = -1;
				if (i == 0 && socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) == 0) {
					slot = expect_slot(pair[0]);
					if (slot < 0) {
						close(pair[0]);
						close(pair[1]);
						pair[0] = pair[1] = -1;
					}
				}
				pid_t pid = fork();
				if (pid == 0) {
					sigprocmask(SIG_UNBLOCK, &chld, NULL);
					for (int j = 0; j < 3; j++)
						if (fds[j] >= 0)
							close(fds[j]);
					if (sfd >= 0)
						close(sfd);
					for (int j = 0; j < MAX_CHILDREN; j++)
						if (expected[j].ctrl >= 0)
							close(expected[j].ctrl);
					if (i == 0) {
						serve_request(c, pair[1]);
						_exit(0);
					}
					/* sshd in inetd mode on this connection (or inetd's telnet line). */
					int flags = fcntl(c, F_GETFD);
					fcntl(c, F_SETFD, flags & ~FD_CLOEXEC);
					dup2(c, 0);
					dup2(c, 1);
					if (c > 1)
						close(c);
					if (svc->telnet) {
						dup2(0, 2);
						telnet_inetd_exec();
					}
					static char *const sshd[] = {"/usr/sbin/sshd", "-i", NULL};
					execv(sshd[0], sshd);
					_exit(127);
				}
				if (pid > 0)
					children++;
				else if (slot >= 0)
					expect_free(&expected[slot]);
				if (pair[1] >= 0)
					close(pair[1]);
				close(c);
			}
		}
	}
}
