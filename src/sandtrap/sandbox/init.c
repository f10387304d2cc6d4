/*
 * A small PID 1 for a container: start a couple of system daemons if they are
 * installed, reap every orphan that gets re-parented to us, and on SIGTERM,
 * SIGINT or SIGPWR ask every process to stop, wait briefly, then exit 0.
 *
 * Signals are blocked and collected with sigwait(), so there is no handler and
 * no race between "check for a stop request" and "wait for a child".
 */
#include <fcntl.h>
#include <sys/stat.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define GRACE_TENTHS 30 /* 3 s between SIGTERM and SIGKILL */

static sigset_t watched;

static void start(char *const argv[])
{
	if (access(argv[0], X_OK) != 0)
		return; /* not installed: nothing to start */
	if (fork() != 0)
		return; /* parent (or fork failed): carry on without it */
	sigprocmask(SIG_UNBLOCK, &watched, NULL);
	setsid();
	int null = open("/dev/null", O_RDWR);
	if (null >= 0) {
		dup2(null, 0);
		dup2(null, 1);
		dup2(null, 2);
		if (null > 2)
			close(null);
	}
	execv(argv[0], argv);
	_exit(127);
}

/* Reap every exited child; return whether any children are still alive. */
static int reap(void)
{
	pid_t pid;
	while ((pid = waitpid(-1, NULL, WNOHANG)) > 0)
		;
	return pid == 0;
}

static void stop_all(void)
{
	const struct timespec tenth = {0, 100 * 1000 * 1000};

	kill(-1, SIGTERM);
	for (int i = 0; i < GRACE_TENTHS; i++) {
		if (!reap())
			return;
		nanosleep(&tenth, NULL);
	}
	kill(-1, SIGKILL);
	reap();
}

/* What a boot leaves in /run (a fresh tmpfs here): the login records file, owned by group utmp. */
static void prepare_run(void)
{
	int fd = open("/run/utmp", O_WRONLY | O_CREAT | O_CLOEXEC, 0664);
	if (fd >= 0) {
		if (fchown(fd, 0, 43) != 0) /* 43 = Debian's utmp group */
			(void)0;
		fchmod(fd, 0664);
		close(fd);
	}
}

int main(void)
{
	static char *const cron[] = {"/usr/sbin/cron", "-f", NULL};
	static char *const rsyslog[] = {"/usr/sbin/rsyslogd", "-n", "-iNONE", NULL};

	sigemptyset(&watched);
	sigaddset(&watched, SIGCHLD);
	sigaddset(&watched, SIGTERM);
	sigaddset(&watched, SIGINT);
	sigaddset(&watched, SIGPWR);
	sigprocmask(SIG_BLOCK, &watched, NULL);

	prepare_run();
	start(rsyslog);
	start(cron);

	for (;;) {
		int sig = 0;
		if (sigwait(&watched, &sig) != 0)
			continue;
		if (sig == SIGCHLD) {
			reap();
			continue;
		}
		stop_all();
		return 0;
	}
}
