/*
 * Accounts as the box's files hold them, for the session helper (session.c) and the listener
 * (listener.c, in init). /etc/passwd and /etc/group are read directly: a static binary must not
 * depend on NSS modules.
 */
#ifndef ACCOUNTS_H
#define ACCOUNTS_H

#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>

static struct passwd *find_user(const char *name)
{
	FILE *f = fopen("/etc/passwd", "r");
	struct passwd *pw = NULL;
	if (!f)
		return NULL;
	while ((pw = fgetpwent(f)) != NULL)
		if (strcmp(pw->pw_name, name) == 0)
			break;
	fclose(f); /* fgetpwent's result lives in static storage, valid after fclose */
	return pw;
}

/* The user's supplementary groups (at most 64), as initgroups would set them. */
static int set_groups(const char *name, gid_t primary)
{
	gid_t groups[64];
	int n = 0;
	groups[n++] = primary;
	FILE *f = fopen("/etc/group", "r");
	if (f) {
		struct group *gr;
		while ((gr = fgetgrent(f)) != NULL && n < 64) {
			for (char **m = gr->gr_mem; m && *m; m++)
				if (strcmp(*m, name) == 0 && gr->gr_gid != primary) {
					groups[n++] = gr->gr_gid;
					break;
				}
		}
		fclose(f);
	}
	return setgroups((size_t)n, groups);
}

#endif
