/*
 * The host<->box wire protocol's constants, as PROTOCOL.md describes them. Generated from the host's
 * protocol module (boxwire.py, see PROTOCOL.md): do not edit.
 */
#ifndef PROTOCOL_H
#define PROTOCOL_H

#define BOX_SOCKET          "/org/freedesktop/systemd1/private"
#define INETD_SOCKET        "/org/freedesktop/systemd1/inetd"
#define REQUEST_MAGIC       "STB1"
#define REQUEST_MAGIC_SIZE  4
#define REQUEST_FLAGS_AT    4
#define REQUEST_COLS_AT     5
#define REQUEST_ROWS_AT     7
#define REQUEST_ARGC_AT     9
#define REQUEST_ENVC_AT     11
#define REQUEST_HEADER_SIZE 13
#define REQUEST_TTY         1
#define REQUEST_RELAY       2
#define MAX_REQUEST         65536
#define MAX_STRINGS         512
#define MAX_REPLY           512
#define MAX_REPLY_FDS       3
#define MAX_FAILED_TEXT     128
#define REPLY_STARTED       'O'
#define REPLY_EXITED        'X'
#define REPLY_FAILED        'E'
#define REPLY_CONNECT       'R'
#define REPLY_NO_RELAY      'N'
#define SEND_SIGNAL         'K'
#define MAX_SIGNAL          31
#define REQUEST_TIMEOUT_MS  5000
#define RELAY_WAIT_MS       3000
#define EXPECT_TIMEOUT_MS   5000
#define HANGUP_KILL_MS      2000

#endif
