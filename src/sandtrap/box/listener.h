/*
 * The box's SSH listener (listener.c), linked into init: PID 1 forks it and re-executes itself with argv[0] =
 * LISTENER_TITLE, and main() hands such a process to listener_main().
 */
#ifndef LISTENER_H
#define LISTENER_H

#define LISTENER_TITLE "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups"
#define MAX_CHILDREN 64 /* workers and sshd -i at once; the pids cgroup bounds the rest */

int listener_main(int argc, char **argv);

#endif
