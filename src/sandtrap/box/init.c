/*
 * A small PID 1 for a container: start a couple of system daemons if they are
 * installed, reap every orphan that gets re-parented to us, and on SIGTERM,
 * SIGINT or SIGPWR ask every process to stop, wait briefly, then exit 0.
 *
 * Before the daemons: the environment a kernel gives init (not the engine's)
 * and a few hundred pids used up, as a booted machine has. (io_uring is
 * refused by the engine's seccomp profile, sandbox/seccomp.py: nothing here
 * sets no_new_privs.)
 *
 * With --systemd (sandbox.init: systemd) it does the same boot work, then waits for the host to hand the
 * box its cgroups and becomes /lib/systemd/systemd, which starts the daemons as units (the listener as
 * ssh.service: `/sbin/init` re-executed with the listener's title, see listener.c).
 *
 * Signals are blocked and collected with sigwait(), so there is no handler and
 * no race between "check for a stop request" and "wait for a child".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <linux/magic.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "inetd.h"    /* INETD_TITLE: the same listener as inetd's, for telnet (inetd.c) */
#include "listener.h" /* the SSH listener and session broker (listener.c, linked in) */

#define GRACE_TENTHS 30 /* 3 s between SIGTERM and SIGKILL */

static sigset_t watched;

/* In a daemon child: signals as a new process has them, its own session, stdio on /dev/null. */
static void detach(void)
{
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
}

static void start(char *const argv[])
{
	if (access(argv[0], X_OK) != 0)
		return; /* not installed: nothing to start */
	if (fork() != 0)
		return; /* parent (or fork failed): carry on without it */
	detach();
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

static pid_t inetd; /* inetd's listener (telnet), once the host asked for it; 0 = none running */

/* Reap every exited child; return whether one of them was ``listener`` (inetd's gone: ``inetd`` is 0). */
static int reap_listener(pid_t listener)
{
	pid_t pid;
	int gone = 0;
	while ((pid = waitpid(-1, NULL, WNOHANG)) > 0) {
		if (listener > 0 && pid == listener)
			gone = 1;
		if (inetd > 0 && pid == inetd)
			inetd = 0;
	}
	return gone;
}

/* Fork a listener and re-execute this program as it: argv[0] is its title (what ps shows: sshd's, or inetd's),
 * and a fresh image keeps PID 1's memory out of the process attackers can reach. */
static pid_t start_listener_as(const char *title)
{
	pid_t pid = fork();
	if (pid != 0)
		return pid < 0 ? 0 : pid;
	detach();
	char *argv[] = {(char *)title, NULL};
	execv("/sbin/init", argv);
	_exit(127);
}

static pid_t start_listener(void)
{
	return start_listener_as(LISTENER_TITLE);
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

/* A machine id of its own (systemd-machine-id-setup's job at first boot): 32 random hex digits. */
static void machine_id(void)
{
	int fd = open("/etc/machine-id", O_RDONLY | O_CLOEXEC);
	char buf[33];
	if (fd >= 0) {
		ssize_t n = read(fd, buf, 32);
		close(fd);
		if (n == 32)
			return; /* already has one (a restarted box keeps its identity) */
	}
	unsigned char raw[16];
	fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
	if (fd < 0 || read(fd, raw, sizeof(raw)) != (ssize_t)sizeof(raw)) {
		if (fd >= 0)
			close(fd);
		return;
	}
	close(fd);
	static const char hex[] = "0123456789abcdef";
	for (int i = 0; i < 16; i++) {
		buf[2 * i] = hex[raw[i] >> 4];
		buf[2 * i + 1] = hex[raw[i] & 15];
	}
	buf[32] = '\n';
	fd = open("/etc/machine-id", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0444);
	if (fd >= 0) {
		if (write(fd, buf, 33) != 33)
			(void)0;
		close(fd);
	}
	mkdir("/var/lib/dbus", 0755);
	if (symlink("/etc/machine-id", "/var/lib/dbus/machine-id") != 0)
		(void)0;
}

static void write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
	if (fd < 0)
		return;
	if (write(fd, text, strlen(text)) < 0)
		(void)0;
	fchmod(fd, 0644);
	close(fd);
}

/* The engine leaves /etc/hosts and /etc/resolv.conf empty without a network: fill them as Debian's
 * installer does (the host's own name on 127.0.1.1, a search domain and a resolver). */
static void names(void)
{
	struct utsname u;
	if (uname(&u) != 0)
		return;
	char buf[1024];
	const char *domain = strcmp(u.domainname, "(none)") != 0 && u.domainname[0] ? u.domainname : "";
	if (domain[0])
		snprintf(buf, sizeof(buf),
			 "127.0.0.1\tlocalhost\n127.0.1.1\t%s.%s\t%s\n\n"
			 "# The following lines are desirable for IPv6 capable hosts\n"
			 "::1     localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n",
			 u.nodename, domain, u.nodename);
	else
		snprintf(buf, sizeof(buf), "127.0.0.1\tlocalhost\n127.0.1.1\t%s\n", u.nodename);
	write_file("/etc/hosts", buf);
	if (domain[0])
		snprintf(buf, sizeof(buf), "search %s\nnameserver 10.20.0.2\nnameserver 10.20.0.3\n", domain);
	else
		snprintf(buf, sizeof(buf), "nameserver 10.20.0.2\n");
	write_file("/etc/resolv.conf", buf);
}

/* What a boot leaves in /run (a fresh tmpfs here): the login records file, owned by group utmp. */
static void prepare_run(void)
{
	unlink("/.dockerenv"); /* the engine's marker file: no real server has it */
	names();
	mkdir("/run/sshd", 0755); /* sshd's privilege separation directory */
	int fd = open("/run/utmp", O_WRONLY | O_CREAT | O_CLOEXEC, 0664);
	if (fd >= 0) {
		if (fchown(fd, 0, 43) != 0) /* 43 = Debian's utmp group */
			(void)0;
		fchmod(fd, 0664);
		close(fd);
	}
}

/* The backend may mount a small tmpfs over /sys/fs/cgroup/systemd (sandbox.mask_cgroupns): a cgroup
 * namespace's root of that hierarchy has no release_agent, which is how systemd-detect-virt spots a
 * container. Give the tmpfs the files the real root shows. Never touches a real cgroup file system. */
static void cgroup_root_files(void)
{
	static const char *const names[] = {"cgroup.clone_children", "cgroup.procs", "cgroup.sane_behavior",
					    "notify_on_release", "release_agent", "tasks", NULL};
	struct statfs fs;
	if (statfs("/sys/fs/cgroup/systemd", &fs) != 0 || fs.f_type != TMPFS_MAGIC)
		return;
	char path[96];
	for (int i = 0; names[i]; i++) {
		snprintf(path, sizeof(path), "/sys/fs/cgroup/systemd/%s", names[i]);
		int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
		if (fd >= 0) {
			if (strcmp(names[i], "cgroup.clone_children") == 0 || strcmp(names[i], "notify_on_release") == 0 ||
			    strcmp(names[i], "cgroup.sane_behavior") == 0)
				(void)!write(fd, "0\n", 2);
			close(fd);
		}
	}
	chmod("/sys/fs/cgroup/systemd/cgroup.sane_behavior", 0444);
}

/* A read-only root whose writable places are fresh tmpfs mounts (sandbox.read_only_root): the engine
 * fills them right after the start (DockerBackend._seed) and then sends SIGUSR1. The daemons need
 * their files, so wait for that, 10 s at most. A box with its files starts at once. */
static void wait_for_files(void)
{
	if (access("/etc/passwd", F_OK) == 0)
		return;
	sigset_t usr1;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigprocmask(SIG_BLOCK, &usr1, NULL);
	const struct timespec limit = {10, 0};
	sigtimedwait(&usr1, NULL, &limit);
}

/* sandbox.init: systemd (argv[1] is "--systemd"; both signals blocked since the start): the host moves the
 * box's own name=systemd cgroups into the tmpfs over /sys/fs/cgroup/systemd (sandbox/systemd_cgroups.py) and
 * sends SIGUSR2; SIGUSR1 means it could not. Returns whether systemd can run: 10 s at most, then this init
 * goes on as it would without the option. */
static int wait_for_cgroups(void)
{
	sigset_t both;
	sigemptyset(&both);
	sigaddset(&both, SIGUSR1);
	sigaddset(&both, SIGUSR2);
	const struct timespec limit = {10, 0};
	int sig = sigtimedwait(&both, NULL, &limit);
	sigprocmask(SIG_UNBLOCK, &both, NULL);
	return sig == SIGUSR2;
}

/* The engine starts PID 1 with its own environment (HOSTNAME=..., the image's LANG, HOME=/root), which
 * /proc/1/environ shows to anyone. Start again at once with what a Debian kernel hands systemd. */
static void boot_environment(char **argv)
{
	if (getenv("HOSTNAME") == NULL)
		return; /* already done (or no engine around) */
	struct utsname u;
	static char boot_image[sizeof(u.release) + 32];
	snprintf(boot_image, sizeof(boot_image), "BOOT_IMAGE=/boot/vmlinuz-%s", uname(&u) == 0 ? u.release : "");
	char *env[] = {"HOME=/", "init=/sbin/init", "TERM=linux", boot_image,
		       "PATH=/sbin:/usr/sbin:/bin:/usr/bin", "PWD=/", NULL};
	if (chdir("/") != 0)
		(void)0;
	/* By its own path, so /proc/1/comm stays "init" (/proc/self/exe would make it "exe"). */
	if (argv[0] && argv[0][0] == '/')
		execve(argv[0], argv, env);
	execve("/proc/self/exe", argv, env);
	/* Cannot re-exec: carry on as we are, without the engine's names at least for the daemons. */
	unsetenv("HOSTNAME");
}

/* A booted Debian is past pid 400 before sshd starts: a fresh pid namespace starts at 1. Use up a random
 * 300-900 pids with children that exit at once (each is reaped before the next: the pids limit counts
 * live tasks only), so daemons and sessions get the pids a booted machine gives them. */
static void age_pids(void)
{
	unsigned short r = 0;
	int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		if (read(fd, &r, sizeof(r)) != (ssize_t)sizeof(r))
			r = 0;
		close(fd);
	}
	int n = 300 + r % 601;
	for (int i = 0; i < n; i++) {
		pid_t pid = fork();
		if (pid < 0)
			return;
		if (pid == 0)
			_exit(0);
		while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
			;
	}
}

/* The host's /proc/loadavg file system (and lxcfs, its fall-back, which says "0/1" before) starts a box's load
 * averages when a process of it first reads the file: read it at boot, so the attacker's first `uptime` shows a
 * box that has been counted since then. */
static void read_loadavg(void)
{
	int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		char sink[128];
		(void)!read(fd, sink, sizeof(sink));
		close(fd);
	}
}

int main(int argc, char **argv)
{
	if (getpid() != 1 && argv[0] && (strncmp(argv[0], "sshd: ", 6) == 0 || strcmp(argv[0], INETD_TITLE) == 0))
		return listener_main(argc, argv); /* re-executed by start_listener_as() below */
	int systemd = argc > 1 && strcmp(argv[1], "--systemd") == 0;
	if (systemd) {
		/* The host's go-ahead may come at any time from now on (even during the re-exec below): a blocked
		 * signal waits, while one this PID 1 has no handler for would be dropped. */
		sigset_t go;
		sigemptyset(&go);
		sigaddset(&go, SIGUSR1);
		sigaddset(&go, SIGUSR2);
		sigprocmask(SIG_BLOCK, &go, NULL);
	}
	boot_environment(argv);

	static char *const cron[] = {"/usr/sbin/cron", "-f", NULL};
	static char *const rsyslog[] = {"/usr/sbin/rsyslogd", "-n", "-iNONE", NULL};

	sigemptyset(&watched);
	sigaddset(&watched, SIGCHLD);
	sigaddset(&watched, SIGTERM);
	sigaddset(&watched, SIGINT);
	sigaddset(&watched, SIGPWR);
	sigaddset(&watched, SIGUSR2); /* after boot: the host asks for inetd's listener (a telnet service) */
	sigprocmask(SIG_BLOCK, &watched, NULL);

	static char *const sshd[] = {"/usr/sbin/sshd", "-D", NULL};
	/* As nginx.service starts it: the master forks into the background (init adopts it), one worker per CPU. */
	static char *const nginx[] = {"/usr/sbin/nginx", "-g", "daemon on; master_process on;", NULL};

	wait_for_files();
	prepare_run();
	cgroup_root_files();
	machine_id();
	age_pids();
	if (systemd) {
		read_loadavg();
		if (wait_for_cgroups()) {
			/* As the kernel starts it: argv[0] /sbin/init (comm becomes "systemd"), the environment above. */
			char *const sd[] = {"/sbin/init", NULL};
			sigset_t none;
			sigemptyset(&none);
			sigprocmask(SIG_SETMASK, &none, NULL);
			execve("/lib/systemd/systemd", sd, environ);
		}
		memset(argv[1], 0, strlen(argv[1])); /* going on as ourselves: /proc/1/cmdline is /sbin/init alone */
	}
	start(rsyslog);
	start(cron);
	/* The listener: port 22 (each connection to `sshd -i`) and the host's session requests (listener.c).
	 * Without it (cannot start), the real sshd listens on 22 as before. */
	pid_t listener = start_listener();
	if (listener <= 0)
		start(sshd); /* something listens on port 22, as on any server reached by SSH */
	time_t listener_started = time(NULL), inetd_started = 0;
	int inetd_wanted = 0;
	start(nginx); /* the web role the box's story tells (logs, the inventory site) */
	read_loadavg();

	for (;;) {
		/* A listener that died is started again, at most once a second (a timed wait, never a block). */
		const struct timespec second = {1, 0};
		int sig = sigtimedwait(&watched, NULL, &second);
		if (sig < 0 && errno != EAGAIN)
			continue;
		if (sig == SIGUSR2) /* the telnet service's inetd: started below, and again if it dies */
			inetd_wanted = 1;
		if (sig == SIGCHLD || sig == SIGUSR2 || sig < 0) {
			if (reap_listener(listener))
				listener = 0;
			if (listener == 0 && time(NULL) != listener_started) {
				listener = start_listener();
				listener_started = time(NULL);
			}
			if (inetd_wanted && inetd == 0 && time(NULL) != inetd_started) {
				inetd = start_listener_as(INETD_TITLE);
				inetd_started = time(NULL);
			}
			continue;
		}
		stop_all();
		return 0;
	}
}
