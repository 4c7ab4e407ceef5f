/*
 * The few libssh2 1.11.1 entry points the pump calls, declared by hand.
 *
 * ssh2-python's wheel ships libssh2 (ssh2_python.libs/libssh2-*.so) but not
 * its header; these prototypes are copied from include/libssh2.h at tag
 * libssh2-1.11.1 so that the pump links against that very copy and nothing
 * else (one libssh2 in the process).
 */
#ifndef SSHPUMP_LIBSSH2_MIN_H
#define SSHPUMP_LIBSSH2_MIN_H

#include <sys/types.h>

typedef struct _LIBSSH2_SESSION LIBSSH2_SESSION;
typedef struct _LIBSSH2_CHANNEL LIBSSH2_CHANNEL;
typedef int libssh2_socket_t;
typedef void(libssh2_cb_generic)(void);

#define LIBSSH2_ERROR_EAGAIN -37
#define LIBSSH2_ERROR_CHANNEL_CLOSED -26
#define LIBSSH2_ERROR_CHANNEL_EOF_SENT -27
#define LIBSSH2_SESSION_BLOCK_INBOUND 0x0001
#define LIBSSH2_SESSION_BLOCK_OUTBOUND 0x0002
#define LIBSSH2_CALLBACK_RECV 6

ssize_t libssh2_channel_read_ex(LIBSSH2_CHANNEL *channel, int stream_id,
                                char *buf, size_t buflen);
ssize_t libssh2_channel_write_ex(LIBSSH2_CHANNEL *channel, int stream_id,
                                 const char *buf, size_t buflen);
unsigned long libssh2_channel_window_read_ex(LIBSSH2_CHANNEL *channel,
                                             unsigned long *read_avail,
                                             unsigned long *window_size_initial);
unsigned long libssh2_channel_window_write_ex(LIBSSH2_CHANNEL *channel,
                                              unsigned long *window_size_initial);
int libssh2_channel_receive_window_adjust2(LIBSSH2_CHANNEL *channel,
                                           unsigned long adjustment,
                                           unsigned char force,
                                           unsigned int *storewindow);
int libssh2_channel_send_eof(LIBSSH2_CHANNEL *channel);
int libssh2_channel_eof(LIBSSH2_CHANNEL *channel);
int libssh2_channel_wait_eof(LIBSSH2_CHANNEL *channel);
int libssh2_channel_close(LIBSSH2_CHANNEL *channel);
int libssh2_channel_wait_closed(LIBSSH2_CHANNEL *channel);
int libssh2_session_last_errno(LIBSSH2_SESSION *session);
int libssh2_session_block_directions(LIBSSH2_SESSION *session);
long libssh2_session_get_timeout(LIBSSH2_SESSION *session);
libssh2_cb_generic *libssh2_session_callback_set2(LIBSSH2_SESSION *session,
                                                  int cbtype,
                                                  libssh2_cb_generic *callback);

#endif
