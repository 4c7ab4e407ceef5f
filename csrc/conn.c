/*
 * One connection of the pump: a client socket and its libssh2 channel.
 *
 * Each direction has its own state, and moves forward one step at a time:
 *   up   (client -> channel): OPEN -> DRAIN (client sent EOF, flushing our
 *        buffer into the channel) -> DONE (channel EOF sent)
 *   down (channel -> client): OPEN -> DRAIN (channel EOF seen, flushing our
 *        buffer into the client) -> DONE (client shutdown(SHUT_WR))
 * and the connection as a whole, once: running -> closing (channel EOF if
 * not sent, CLOSE, wait for the server's CLOSE), then it is reported
 * finished and freed (conn_finish in pump.c). Closing starts when both
 * directions are DONE, or at once when the connection is cut (conn_abort).
 * Only set_up(), set_down() and set_closing() change these states, and they
 * refuse every other edge (see refuse()). Events (a peer's EOF) move a
 * state; actions (sending EOF on, shutting the client's write side) happen
 * once a direction has drained, and move it to DONE when they succeeded.
 * Moving the bytes of each direction is flow.c.
 *
 * This file is the bottom of the pump: it calls neither flow.c nor pump.c.
 * flow.c builds on it, and pump.c on both.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pump_private.h"

/* libssh2_channel_abort() (CLOSE without EOF) exists only in sshpump's patched
   libssh2 (csrc/libssh2-channel-abort.patch): looked up at run time, so the
   pump also runs on the stock library (SSHPUMP_LIBSSH2=stock), where a cut
   channel gets EOF + CLOSE like any other. */
typedef int (*channel_abort_fn)(LIBSSH2_CHANNEL *);
static channel_abort_fn channel_abort;
#ifdef PUMP_DEBUG
static int trace;  /* SSHPUMP_PUMP_TRACE set: log every state change */
#endif

void conn_init_once(void)
{
    static int looked;
    if (looked)
        return;
    looked = 1;
    *(void **)&channel_abort = dlsym(RTLD_DEFAULT, "libssh2_channel_abort");
#ifdef PUMP_DEBUG
    trace = getenv("SSHPUMP_PUMP_TRACE") != NULL;
#endif
}

/* ---- the session, as a connection sees it ------------------------------- */

void session_failed(struct pump *p, int err)
{
    if (!p->dead)
        p->dead = err ? err : -1;
}

int can_send_small(struct pump *p)
{
    struct pollfd pfd = {.fd = p->ssh_fd, .events = POLLOUT};
    if (p->out_blocked)
        return 0;
    return poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLOUT);
}

/* ---- states: the only writers of c->up, c->down, c->closing ------------- */

static const char *const state_names[] = {"open", "drain", "done"};

static const char *state_name(int s)
{
    return s >= 0 && s <= UP_DONE ? state_names[s] : "?";
}

/* An impossible state change is a bug in this file, never a peer's doing,
   so it must not pass silently nor take the other connections down. It is
   said on stderr (the worker's log) in every build. A PUMP_DEBUG build (the
   sanitizer build of the tests) then aborts the process, so that the
   traffic tests fail at the faulty step. A release build instead cuts this
   one connection with its own end reason, PUMP_END_STATE: the client sees
   a reset, the channel is closed, the worker logs the reason, and the
   session and every other connection go on. The state is left as it was;
   the caller must stop handling the connection (the setters return -1). */
static int refuse(struct pump *p, struct conn *c, const char *what,
                  const char *from, const char *to)
{
    fprintf(stderr, "sshpump pump: conn %d: %s %s -> %s refused "
            "(impossible state change)\n", c->id, what, from, to);
#ifdef PUMP_DEBUG
    abort();
#endif
    conn_abort(p, c, PUMP_END_STATE, 0);  /* no-op if already closing */
    return -1;
}

static void trace_change(struct conn *c, const char *what, const char *from,
                         const char *to)
{
#ifdef PUMP_DEBUG
    if (trace)
        fprintf(stderr, "sshpump pump: conn %d: %s %s -> %s\n", c->id, what,
                from, to);
#else
    (void)c;
    (void)what;
    (void)from;
    (void)to;
#endif
}

/* The legal edges of a direction: one step forward, while the connection
   still runs (a closing connection's directions never move again). */
int set_up(struct pump *p, struct conn *c, int to)
{
    if (c->closing || to != c->up + 1)
        return refuse(p, c, "up", c->closing ? "closing" : state_name(c->up),
                      state_name(to));
    trace_change(c, "up", state_name(c->up), state_name(to));
    c->up = to;
    return 0;
}

int set_down(struct pump *p, struct conn *c, int to)
{
    if (c->closing || to != c->down + 1)
        return refuse(p, c, "down",
                      c->closing ? "closing" : state_name(c->down),
                      state_name(to));
    trace_change(c, "down", state_name(c->down), state_name(to));
    c->down = to;
    return 0;
}

/* Running -> closing, from any direction states, once; the first cause is
   the one reported. Callers that may see a second cause (conn_abort) filter
   it out before: reaching here twice is a bug. */
int set_closing(struct pump *p, struct conn *c, int reason, int err)
{
    if (c->closing)
        return refuse(p, c, "conn", "closing", "closing");
    trace_change(c, "conn", "running", "closing");
    c->closing = 1;
    c->reason = reason;
    c->err = err;
    return 0;
}

/* ---- buffers and owed window adjusts ------------------------------------ */

/* The one setter of a connection's owed window adjust (rpending: half-sent
   inside channel_read; wadj: our own, with its amount). p->owed counts the
   connections owing one: while any does, no connection starts a new channel
   write (step_up), so a download's adjusts are not starved by an upload
   that keeps the session's single send buffer full (a starved adjust closes
   the download's window: one direction then crawls while the other runs). */
void set_owed(struct pump *p, struct conn *c, int rpending, unsigned long wadj)
{
    int before = c->rpending || c->wadj;
    c->rpending = rpending;
    c->wadj = wadj;
    p->owed += (rpending || wadj) - before;
}

void drop_ubuf(struct pump *p, struct conn *c)
{
    if (!c->ubuf)
        return;
    p->buffered -= c->ulen - c->uoff;
    p->buffers--;
    free(c->ubuf);
    c->ubuf = NULL;
    c->uoff = c->ulen = 0;
}

void drop_dbuf(struct pump *p, struct conn *c)
{
    if (!c->dbuf)
        return;
    p->buffered -= c->dlen - c->doff;
    p->buffers--;
    free(c->dbuf);
    c->dbuf = NULL;
    c->doff = c->dlen = 0;
}

void conn_release_buffers(struct pump *p, struct conn *c)
{
    drop_ubuf(p, c);
    drop_dbuf(p, c);
}

/* ---- ending ------------------------------------------------------------- */

/* Close the client socket; reset: with SO_LINGER 0 (a TCP reset), else
   with lingering off (a normal close that delivers what is queued). */
void client_close(struct pump *p, struct conn *c, int reset)
{
    const struct linger lg = {.l_onoff = reset, .l_linger = 0};
    if (c->fd < 0)
        return;
    epoll_ctl(p->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(c->fd);
    c->fd = -1;
}

/* A connection the pump had to cut must look cut to the client: a TCP
   reset, never a FIN that a client could take for a complete response (a
   unix-socket peer can only see the end of the stream). At once: the
   channel's close goes on without the client. */
void client_reset(struct pump *p, struct conn *c)
{
    client_close(p, c, 1);
}

/* Event: c must stop moving data (a peer failed, a bug, pump_abort, the
   session died). Action: drop what cannot be delivered, reset the client,
   and start closing the channel. A connection already closing keeps its
   first reason. */
void conn_abort(struct pump *p, struct conn *c, int reason, int err)
{
    if (c->closing || set_closing(p, c, reason, err) < 0)
        return;
    /* Closing is work in progress: pump_run steps only connections with
       events or work ("hot"), and a cut from outside (pump_abort) brings no
       event -- the client fd is closed below -- so without this the CLOSE
       would wait for unrelated traffic on the session. */
    c->hot = 1;
    /* Undeliverable bytes are dropped now, except a write libssh2 may have
       half-sent: only the same call can finish that packet, and until it is
       finished every other send of the session fails. step_close (flow.c)
       completes it first. */
    drop_dbuf(p, c);
    if (!c->wpending)
        drop_ubuf(p, c);
    client_reset(p, c);
}

/* Send the channel's CLOSE (step_close in flow.c does it once the last
   bytes and adjusts are out). Returns what libssh2 returned. */
int conn_close_channel(struct conn *c)
{
    /* A cut connection closes its channel without EOF, so the server can
       tell a stream cut short from one that ended; a normal end, or one
       whose EOF is already out, closes as usual. */
    if (c->reason != PUMP_END_NORMAL && c->up != UP_DONE && channel_abort)
        return channel_abort(c->ch);
    return libssh2_channel_close(c->ch);
}

/* Work is pending that no new input will announce: buffered bytes, a send
   to repeat, an EOF to pass on, a close in progress. */
int conn_busy(const struct conn *c)
{
    return c->closing || c->wpending || c->rpending || c->wadj ||
           c->ulen > c->uoff || c->dlen > c->doff || c->up == UP_DRAIN ||
           c->down == DOWN_DRAIN || (c->down == DOWN_DONE && c->up != UP_DONE);
}
