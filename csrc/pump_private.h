/*
 * What the pump's three files share. Not part of the interface: pump.h is.
 * They are layered, each calling only the ones below it:
 *   pump.c  the session: epoll loop, SSH socket, connection table, events,
 *           one connection's round (conn_step), the public pump_* calls
 *   flow.c  one connection's bytes, each direction, and the channel close
 *           (the libssh2 facts)
 *   conn.c  one connection: its states and their setters, buffers, cuts;
 *           what it needs of the session (session_failed, can_send_small)
 * and, beside flow.c (called by pump.c, calling conn.c only):
 *   mux.c   --mux: client connections as streams of one channel to the
 *           remote agent, with their own states, buffers and frames
 */
#ifndef SSHPUMP_PUMP_PRIVATE_H
#define SSHPUMP_PUMP_PRIVATE_H

#include <stddef.h>

#include "libssh2_min.h"
#include "pump.h"

/* Shared between the three files, never exported from the module. */
#define PUMP_INTERNAL __attribute__((visibility("hidden")))

#define MAX_WRITE 32700       /* libssh2 sends at most this per call */
#define MIN_ADJUST 1024       /* LIBSSH2_CHANNEL_MINADJUST */
#define PACKETS_PER_ROUND 4   /* channel writes per connection per round */

/* Direction states (see the top of conn.c). The values are the public
   PUMP_STATE_* ones, so pump_conn_stats() reports them as they are. */
enum { UP_OPEN = PUMP_STATE_OPEN, UP_DRAIN = PUMP_STATE_DRAIN,
       UP_DONE = PUMP_STATE_DONE };
enum { DOWN_OPEN = PUMP_STATE_OPEN, DOWN_DRAIN = PUMP_STATE_DRAIN,
       DOWN_DONE = PUMP_STATE_DONE };

struct conn {
    int id;
    int fd;
    LIBSSH2_CHANNEL *ch;
    int up, down;         /* set only by set_up() / set_down() */
    int closing;          /* channel close in progress; set only by set_closing() */
    int reason, err;      /* why it ends */
    int rd_ready, wr_ready; /* edge-triggered readiness of the client fd */
    int hot;              /* moved bytes in the last round: look again */
    int wpending;         /* channel_write returned EAGAIN: repeat it */
    size_t wlen;          /* length given to that write */
    int rpending;         /* a window adjust inside channel_read is pending */
    unsigned long wadj;   /* explicit window adjust pending: its amount */
    char *ubuf;           /* client -> channel bytes in [uoff, ulen) */
    size_t uoff, ulen;
    char *dbuf;           /* channel -> client bytes in [doff, dlen) */
    size_t doff, dlen;
    unsigned long long nup, ndown;
};

struct pump {
    LIBSSH2_SESSION *s;
    int ssh_fd;
    int ssh_is_tcp;           /* TCP (not a socketpair to a ProxyCommand or jump) */
    int epfd;
    size_t bufsize;
    size_t read_chunk;        /* every channel_read asks for exactly this */
    unsigned long window;     /* receive window to grant each channel, 0 = libssh2's */
    struct conn **conns;      /* indexed by id; NULL = free slot */
    int cap;
    int live;                 /* connections not yet reported done */
    int *free_ids;
    int nfree;
    struct pump_event *evq;   /* events not yet returned */
    int nev, evcap;
    int out_blocked;          /* some send returned EAGAIN this run */
    int owed;                 /* connections owing the server a window adjust */
    unsigned rr;              /* where the next round starts (round robin) */
    int want_in;              /* Python waits for a reply (channel open) */
    LIBSSH2_CHANNEL *control; /* an idle session channel that lets us read the
                                 socket while no connection is open */
    unsigned ssh_events;      /* interest currently set for the SSH socket */
    int dead;                 /* session failed: libssh2 error code */
    int dead_reported;
    unsigned long long rx_bytes;
    unsigned long long rx_scanned;  /* rx_bytes when every channel was last looked at */
    double last_rx;
    unsigned long long buffered, buffers;
    libssh2_cb_generic *orig_recv;  /* ssh2-python's recv, restored on free */
    int in_run;                     /* inside pump_run() */
    int rx_dry;                     /* this round's recv found the socket empty */
    struct mux *mux;                /* --mux lane and its streams (mux.c), or NULL */
};

/* epoll data of a mux stream's client fd: this bit | its slot. */
#define MUX_TAG (1ULL << 40)

/* conn.c: one connection, and what it needs of the session. set_up/set_down
   return 0, or -1 when they refused the change and cut the connection (the
   caller stops there); set_closing returns -1 if it was closing already. */
PUMP_INTERNAL void conn_init_once(void);
PUMP_INTERNAL void session_failed(struct pump *p, int err);
PUMP_INTERNAL int can_send_small(struct pump *p);
PUMP_INTERNAL int set_up(struct pump *p, struct conn *c, int to);
PUMP_INTERNAL int set_down(struct pump *p, struct conn *c, int to);
PUMP_INTERNAL int set_closing(struct pump *p, struct conn *c, int reason,
                              int err);
PUMP_INTERNAL void set_owed(struct pump *p, struct conn *c, int rpending,
                            unsigned long wadj);
PUMP_INTERNAL void drop_ubuf(struct pump *p, struct conn *c);
PUMP_INTERNAL void drop_dbuf(struct pump *p, struct conn *c);
PUMP_INTERNAL void conn_release_buffers(struct pump *p, struct conn *c);
PUMP_INTERNAL void client_close(struct pump *p, struct conn *c, int reset);
PUMP_INTERNAL void client_reset(struct pump *p, struct conn *c);
PUMP_INTERNAL void conn_abort(struct pump *p, struct conn *c, int reason,
                              int err);
PUMP_INTERNAL int conn_close_channel(struct conn *c);
PUMP_INTERNAL int conn_busy(const struct conn *c);

/* flow.c: one connection's bytes. step_up/step_down: non-zero on
   progress; step_close: 1 when the connection is finished. */
PUMP_INTERNAL int step_up(struct pump *p, struct conn *c);
PUMP_INTERNAL int step_down(struct pump *p, struct conn *c);
PUMP_INTERNAL int step_close(struct pump *p, struct conn *c);
PUMP_INTERNAL int finish_adjust(struct pump *p, struct conn *c);

/* mux.c: --mux streams. mux_step: non-zero on progress; mux_abort: conn
   -1 for every stream, err != 0 when the session is dead (no RESET sent). */
PUMP_INTERNAL void mux_client_event(struct pump *p, int slot, unsigned events);
PUMP_INTERNAL int mux_step(struct pump *p);
PUMP_INTERNAL int mux_wants_input(struct pump *p);
PUMP_INTERNAL int mux_busy(struct pump *p);
PUMP_INTERNAL int mux_pop_event(struct pump *p, struct pump_event *e);
PUMP_INTERNAL void mux_abort(struct pump *p, int conn, int err);
PUMP_INTERNAL int mux_conn_stats(struct pump *p, int conn,
                                 struct pump_conn_stats *out);
PUMP_INTERNAL void mux_free(struct pump *p);

#endif
