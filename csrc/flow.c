/*
 * Moving the bytes of one connection, each direction on its own:
 *   step_up:   client -> our buffer -> channel, then the channel EOF
 *   step_down: channel -> our buffer -> client, then shutdown(SHUT_WR)
 * and, once the connection is closing, its channel's end:
 *   step_close: the last half-sent bytes and adjusts, then CLOSE
 * State changes go through set_up()/set_down() and cuts through
 * conn_abort() (conn.c); a refused change has already cut the connection,
 * so the caller returns at once. This file calls conn.c only; pump.c
 * calls it (conn_step).
 *
 * libssh2 1.11.1 facts this file is built around (read from its source):
 *  - a session has one outgoing packet buffer. A send that returned EAGAIN
 *    must be repeated with the same arguments, and until it completes every
 *    other send returns EAGAIN without setting block_directions. So every
 *    operation that returned EAGAIN is retried on every round, and the SSH
 *    socket is watched for writability whenever any send was refused.
 *  - channel_read drains the whole socket into the session's packet list and
 *    counts each channel's pending bytes in read_avail, which
 *    libssh2_channel_window_read_ex() exposes without a syscall. We read a
 *    channel only when it has bytes and our buffer has room: that is the
 *    backpressure (no read -> no window adjust -> the server stops sending).
 *  - a window adjust that returned EAGAIN keeps its packet (with the first
 *    call's amount) but, when finally sent, adds the amount of the call that
 *    completed it to libssh2's idea of the window. If the two differ,
 *    libssh2 believes the window is smaller than the server does and
 *    silently drops the data beyond it ("receive window is full, data
 *    ignored"). So every adjust is repeated with the very same amount:
 *    reads always ask for read_chunk bytes (channel_read derives the amount
 *    from the length), the transport is drained with calls that never
 *    adjust (drain_transport in pump.c), and explicit adjusts remember
 *    their amount.
 *  - packets built on the stack (channel EOF, keepalive) are identified by
 *    their address when resumed, so they must never be left half-sent; they
 *    are only sent when no send is pending and the socket has room.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "pump_private.h"

static int ensure_buf(struct pump *p, char **buf)
{
    if (*buf)
        return 1;
    *buf = malloc(p->bufsize);
    if (!*buf)
        return 0;
    p->buffers++;
    return 1;
}

/* Complete a window adjust that returned EAGAIN, with the amount its
   packet carries (see the top of this file). For an adjust started inside
   channel_read that is what _libssh2_channel_read computed from the same
   read length and the unchanged window. Returns 0 or a libssh2 error. */
int finish_adjust(struct pump *p, struct conn *c)
{
    unsigned long amount = c->wadj;
    int r;
    if (c->rpending) {
        unsigned long initial = 0;
        unsigned long window = libssh2_channel_window_read_ex(c->ch, NULL,
                                                              &initial);
        amount = initial + p->read_chunk - window;
        if (amount < MIN_ADJUST)
            amount = MIN_ADJUST;
    }
    r = libssh2_channel_receive_window_adjust2(c->ch, amount, 1, NULL);
    if (r != LIBSSH2_ERROR_EAGAIN)
        set_owed(p, c, 0, 0);
    return r;
}

/* ---- up: client -> our buffer -> channel -------------------------------- */

/* Returns non-zero on progress. */
int step_up(struct pump *p, struct conn *c)
{
    int moved = 0;
    int packets;

    /* Read the client while the buffer has room. */
    while (c->up == UP_OPEN && c->rd_ready) {
        ssize_t r;
        if (c->ulen == p->bufsize) {
            if (c->uoff == 0 || c->wpending)
                break;  /* full; a pending write pins the bytes in place */
            memmove(c->ubuf, c->ubuf + c->uoff, c->ulen - c->uoff);
            c->ulen -= c->uoff;
            c->uoff = 0;
        }
        if (!ensure_buf(p, &c->ubuf)) {
            conn_abort(p, c, PUMP_END_CLIENT_ERROR, ENOMEM);
            return 1;
        }
        r = recv(c->fd, c->ubuf + c->ulen, p->bufsize - c->ulen, 0);
        if (r > 0) {
            c->ulen += (size_t)r;
            p->buffered += (size_t)r;
            moved = 1;
        } else if (r == 0) {
            /* Event: the client sent EOF. */
            if (set_up(p, c, UP_DRAIN) < 0)
                return 1;
            moved = 1;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            c->rd_ready = 0;
        } else if (errno != EINTR) {
            conn_abort(p, c, PUMP_END_CLIENT_ERROR, errno);
            return 1;
        }
    }

    /* Feed the channel. libssh2 takes one packet per call; a few per round,
       so that every connection of the session gets its turn at the single
       send buffer (the rounds go round robin). */
    for (packets = 0; c->ulen > c->uoff && !p->dead; packets++) {
        size_t len;
        ssize_t w;
        if (!c->wpending && p->owed > 0)
            break;  /* an adjust goes first; its sender makes the progress */
        if (!c->wpending && packets == PACKETS_PER_ROUND) {
            moved = 1;  /* more to send: come back next round */
            break;
        }
        if (!c->wpending && libssh2_channel_window_write_ex(c->ch, NULL) == 0)
            break;  /* remote window closed: a WINDOW_ADJUST will reopen it */
        len = c->wpending ? c->wlen : c->ulen - c->uoff;
        if (len > MAX_WRITE)
            len = MAX_WRITE;
        w = libssh2_channel_write_ex(c->ch, 0, c->ubuf + c->uoff, len);
        if (w > 0) {
            c->uoff += (size_t)w;
            c->nup += (unsigned long long)w;
            p->buffered -= (size_t)w;
            c->wpending = 0;
            moved = 1;
        } else if (w == LIBSSH2_ERROR_EAGAIN) {
            /* Same buffer and length next time: libssh2 may have built or
               half-sent the packet already. */
            c->wpending = 1;
            c->wlen = len;
            p->out_blocked = 1;
            break;
        } else if (w == 0) {
            break;  /* window filled up while draining */
        } else if (w == LIBSSH2_ERROR_CHANNEL_CLOSED ||
                   w == LIBSSH2_ERROR_CHANNEL_EOF_SENT) {
            conn_abort(p, c, PUMP_END_CHANNEL_ERROR, (int)w);
            return 1;
        } else {
            session_failed(p, (int)w);
            return 1;
        }
    }
    if (c->ubuf && c->uoff == c->ulen) {
        /* Idle connections hold no buffer: thousands of them stay cheap. */
        drop_ubuf(p, c);
    }

    /* Action: the client finished sending and everything is in the
       channel: send EOF on. */
    if (c->up == UP_DRAIN && c->ulen == c->uoff && !p->dead) {
        int r;
        if (!can_send_small(p)) {
            p->out_blocked = 1;
            return moved;
        }
        r = libssh2_channel_send_eof(c->ch);
        if (r == 0) {
            if (set_up(p, c, UP_DONE) < 0)
                return 1;
            moved = 1;
        } else if (r == LIBSSH2_ERROR_EAGAIN) {
            p->out_blocked = 1;
        } else {
            conn_abort(p, c, PUMP_END_CHANNEL_ERROR, r);
            return 1;
        }
    }
    return moved;
}

/* ---- down: channel -> our buffer -> client ------------------------------ */

/* With --window, keep the channel's receive window near p->window.
   libssh2's own adjusts (inside channel_read) aim at its 2 MiB initial
   window, so as data was read a larger window shrank back to 2 MiB after
   the first few MiB, and --window bought almost nothing on long links.
   Once a quarter of the window is consumed, owe an adjust that restores
   it; step_down sends it (finish_adjust) before reading further. Only
   bytes already taken from libssh2 are re-granted: a slow client still
   stops the server after at most p->window bytes. */
static void top_up_window(struct pump *p, struct conn *c)
{
    unsigned long window;
    if (!p->window || c->wadj || c->rpending)
        return;
    window = libssh2_channel_window_read_ex(c->ch, NULL, NULL);
    if (window < p->window / 4 * 3)
        set_owed(p, c, 0, p->window - window);
}

/* Event, when libssh2 has nothing more to read for c: did the server send
   EOF? Returns 1 if the state moved, 0 if not, -1 if the change was
   refused (c is closing now). */
static int check_channel_eof(struct pump *p, struct conn *c)
{
    if (libssh2_channel_eof(c->ch) != 1)
        return 0;
    return set_down(p, c, DOWN_DRAIN) < 0 ? -1 : 1;
}

/* Returns non-zero on progress. */
int step_down(struct pump *p, struct conn *c)
{
    int moved = 0;

    for (;;) {
        /* Deliver what we hold. */
        while (c->dlen > c->doff && c->wr_ready) {
            ssize_t w = send(c->fd, c->dbuf + c->doff, c->dlen - c->doff,
                             MSG_NOSIGNAL);
            if (w > 0) {
                c->doff += (size_t)w;
                c->ndown += (unsigned long long)w;
                p->buffered -= (size_t)w;
                moved = 1;
            } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                c->wr_ready = 0;
            } else if (w < 0 && errno == EINTR) {
                continue;
            } else {
                conn_abort(p, c, PUMP_END_CLIENT_ERROR, w < 0 ? errno : EPIPE);
                return 1;
            }
        }
        if (c->dbuf && c->doff == c->dlen)
            drop_dbuf(p, c);

        if (c->down != DOWN_OPEN || p->dead)
            break;
        if (c->wadj || (c->rpending && p->bufsize - c->dlen < p->read_chunk)) {
            /* An adjust is owed: our own (--window) or one half-sent inside
               an earlier read while the client is now too slow to let us
               read. It must complete, or the session's single send buffer
               stays blocked for every channel. */
            int r = finish_adjust(p, c);
            if (r == LIBSSH2_ERROR_EAGAIN) {
                p->out_blocked = 1;
                break;
            }
            if (r < 0) {
                session_failed(p, r);
                return 1;
            }
            moved = 1;
        }
        if (p->bufsize - c->dlen < p->read_chunk)
            break;  /* slow client: libssh2's window now stops the server */
        {
            unsigned long avail = 0;
            ssize_t r;
            int eof;
            libssh2_channel_window_read_ex(c->ch, &avail, NULL);
            if (avail == 0 && !c->rpending) {
                if ((eof = check_channel_eof(p, c)) < 0)
                    return 1;
                moved |= eof;
                break;
            }
            if (!ensure_buf(p, &c->dbuf)) {
                conn_abort(p, c, PUMP_END_CLIENT_ERROR, ENOMEM);
                return 1;
            }
            /* Always the same length: see the top of this file. */
            r = libssh2_channel_read_ex(c->ch, 0, c->dbuf + c->dlen,
                                        p->read_chunk);
            if (r > 0) {
                c->dlen += (size_t)r;
                p->buffered += (size_t)r;
                set_owed(p, c, 0, 0);
                top_up_window(p, c);
                moved = 1;
                continue;  /* try to deliver it at once */
            }
            if (r == LIBSSH2_ERROR_EAGAIN) {
                /* Data is there but the window adjust that precedes the
                   read could not be sent. */
                set_owed(p, c, 1, 0);
                p->out_blocked = 1;
                break;
            }
            if (r == 0) {
                set_owed(p, c, 0, 0);
                if ((eof = check_channel_eof(p, c)) < 0)
                    return 1;
                moved |= eof;
                break;
            }
            session_failed(p, (int)r);
            return 1;
        }
    }

    /* Action: the server finished sending and the client has it all: pass
       the EOF on. */
    if (c->down == DOWN_DRAIN && c->dlen == c->doff) {
        shutdown(c->fd, SHUT_WR);
        if (set_down(p, c, DOWN_DONE) < 0)
            return 1;
        moved = 1;
    }
    return moved;
}

/* ---- closing: the channel's end ----------------------------------------- */

/* Close the channel: EOF (if not sent), CLOSE, wait for the server's CLOSE.
   Returns 1 when the connection is finished. */
int step_close(struct pump *p, struct conn *c)
{
    int r;
    if (p->dead)
        return 1;  /* nothing can be said to a dead session */
    /* Finish what libssh2 may hold half-sent for this channel (see
       conn_abort); the data goes to a channel that is about to close. */
    if (c->wpending) {
        ssize_t w = libssh2_channel_write_ex(c->ch, 0, c->ubuf + c->uoff,
                                             c->wlen);
        if (w == LIBSSH2_ERROR_EAGAIN) {
            p->out_blocked = 1;
            return 0;
        }
        c->wpending = 0;
        if (w > 0)
            c->nup += (unsigned long long)w;
        drop_ubuf(p, c);
    }
    if (c->rpending || c->wadj) {
        r = finish_adjust(p, c);
        if (r == LIBSSH2_ERROR_EAGAIN) {
            p->out_blocked = 1;
            return 0;
        }
    }
    if (!can_send_small(p)) {
        p->out_blocked = 1;
        return 0;
    }
    r = conn_close_channel(c);  /* without EOF if cut (conn.c) */
    if (r == LIBSSH2_ERROR_EAGAIN) {
        if (libssh2_session_block_directions(p->s) &
            LIBSSH2_SESSION_BLOCK_OUTBOUND)
            p->out_blocked = 1;
        return 0;  /* waiting for the server's CLOSE, or for the socket */
    }
    /* Any other error: libssh2 has marked the channel closed anyway. */
    return 1;
}
