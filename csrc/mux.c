/*
 * --mux: many client connections carried as streams of ONE libssh2 channel
 * (the "lane"), an exec channel to sshpump's remote agent
 * (src/sshpump/mux/agent.py, whose top comment is the frame format). Python
 * starts the agent and checks its hello line, then hands the channel over
 * (pump_mux_start); from then on each client costs Python one call
 * (pump_mux_open) and two events (PUMP_EV_OPENED or a failed open, and
 * PUMP_EV_DONE), never one per chunk.
 *
 * Layering: pump.c calls this file; this file calls conn.c only
 * (session_failed). can_send_small is not needed: frames are ordinary
 * channel data, so no stack-built packet is ever left half-sent here.
 *
 * One stream's states, each changed only by its setter below:
 *   opened  OPENING (OPEN queued or sent) -> OPEN (OPEN_OK came back)
 *   up      (client -> agent) OPEN -> DRAIN (client sent EOF, our EOF frame
 *           owed) -> DONE (EOF frame in the lane's output, after every DATA)
 *   down    (agent -> client) OPEN -> DRAIN (agent's EOF frame came; our
 *           buffer still flushing to the client) -> DONE (shutdown(SHUT_WR))
 * It finishes normally once both are DONE and the agent's CLOSE (it has
 * delivered everything to the target and closed it) has come; otherwise it
 * is cut: a failed open, a RESET from the agent, a client error, an abort,
 * or the lane's end. A cut stream is freed at once; if the agent knows it, a
 * RESET frame for its id is queued (stray frames for an id no longer live
 * are ignored: ids carry a generation, so a reused slot gets a new id).
 *
 * Flow control: each stream starts with PUMP_MUX_WINDOW bytes of credit each
 * way. We read a client only while the agent's credit lasts, and return
 * credit (WINDOW frames) only for bytes the client socket took, so our
 * per-stream buffer never exceeds the window and a slow client stalls only
 * its own stream. Output order: control frames (OPEN, WINDOW, EOF, RESET)
 * first, then DATA read from ready clients round robin, one chunk each per
 * turn, straight into the lane's output buffer behind its header.
 *
 * libssh2 facts used (see flow.c): a write that returned EAGAIN is repeated
 * with the same pointer and length, so the output buffer has a fixed
 * capacity and is compacted only while no write is pending; reads of the
 * lane always ask for read_chunk bytes (the window-adjust quirk), into an
 * input buffer that always has that much room because every complete frame
 * is consumed at once (DATA is bounded by the stream windows, not by the
 * lane).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pump_private.h"

/* Frame types and header: as agent.py. */
enum { F_OPEN = 1, F_OPEN_OK, F_OPEN_FAIL, F_DATA, F_WINDOW, F_EOF, F_CLOSE,
       F_RESET, F_PING, F_PONG, F_GOAWAY };
#define MUX_VERSION 1
#define HDR 12
#define CHUNK 32768              /* DATA payload per frame we send */
#define MAX_IN_FRAME (65536 + HDR) /* the agent sends DATA of 32 KiB at most */
#define OUT_CAP (256 << 10)       /* the lane's output buffer, fixed */
#define LANE_PACKETS 16           /* channel writes per round */
#define SLOT_BITS 20              /* stream id = generation << 20 | slot */
#define MAX_SLOTS (1 << SLOT_BITS)

enum { OPENING = 0, OPENED = 1 };
enum { NEED_OPEN = 1, NEED_WINDOW = 2, NEED_EOF = 4 };

struct mstream {
    int slot;
    uint32_t sid;
    int fd;
    int opened, up, down;   /* set only by set_opened / mset_up / mset_down */
    int agent_closed;       /* the agent's CLOSE came */
    int rd_ready, wr_ready; /* edge-triggered readiness of the client fd */
    int in_ready, in_ctl, in_down; /* queued on the lane's lists */
    unsigned need;          /* control frames owed, NEED_* */
    char *target;           /* OPEN payload, until sent */
    unsigned tlen;
    long credit;            /* bytes the agent lets us send */
    unsigned long owed;     /* delivered to the client, not yet credited back */
    char *dbuf;             /* agent -> client bytes in [doff, dlen) */
    size_t doff, dlen;
    unsigned long long nup, ndown;
};

/* A list of slots, appended at the tail, consumed from the head. */
struct slotq {
    int *v;
    int n, cap;
};

struct mux {
    LIBSSH2_CHANNEL *ch;    /* NULL: no lane (never started, or lost) */
    struct mstream **s;     /* by slot */
    uint16_t *gen;          /* by slot: generation of its next stream */
    int cap, live;
    int *free_slots;
    int nfree;
    struct slotq ready, ctl, down; /* clients to read, frames owed, clients to write */
    uint32_t *resets;       /* ids owed a RESET frame */
    int nresets, resets_cap;
    char *out;              /* OUT_CAP bytes; frames in [ooff, olen) */
    size_t ooff, olen;
    int wpending;           /* a channel write returned EAGAIN: repeat it */
    size_t wlen;
    char *in;               /* frames from the agent in [0, ilen) */
    size_t ilen, icap;
    int rpending;           /* a lane read returned EAGAIN: repeat it */
    int lost;               /* the lane ended: reason for Python (err) */
    struct pump_event *evq; /* events for pump.c to hand on, in [evhead, nev) */
    int evhead, nev, evcap;
};

/* ---- small helpers ------------------------------------------------------- */

static void put32(char *b, uint32_t v)
{
    b[0] = (char)(v >> 24); b[1] = (char)(v >> 16);
    b[2] = (char)(v >> 8);  b[3] = (char)v;
}

static uint32_t get32(const char *b)
{
    const unsigned char *u = (const unsigned char *)b;
    return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 | u[3];
}

static void put_header(char *b, int type, uint32_t sid, uint32_t len)
{
    b[0] = MUX_VERSION;
    b[1] = (char)type;
    b[2] = b[3] = 0;
    put32(b + 4, sid);
    put32(b + 8, len);
}

static int q_push(struct slotq *q, int slot)
{
    if (q->n == q->cap) {
        int ncap = q->cap ? q->cap * 2 : 64;
        int *nv = realloc(q->v, (size_t)ncap * sizeof(*nv));
        if (!nv)
            return -1;
        q->v = nv;
        q->cap = ncap;
    }
    q->v[q->n++] = slot;
    return 0;
}

static void push_event(struct mux *m, int kind, struct mstream *s, int reason,
                       int err, int code)
{
    struct pump_event *e;
    if (m->nev == m->evcap) {
        int ncap = m->evcap ? m->evcap * 2 : 64;
        struct pump_event *nq = realloc(m->evq, (size_t)ncap * sizeof(*nq));
        if (!nq)
            return; /* out of memory: the event is lost, never the bytes */
        m->evq = nq;
        m->evcap = ncap;
    }
    e = &m->evq[m->nev++];
    memset(e, 0, sizeof(*e));
    e->kind = kind;
    e->conn = s ? PUMP_MUX_BASE + s->slot : -1;
    e->reason = reason;
    e->err = err;
    e->code = code;
    if (s) {
        e->up = s->nup;
        e->down = s->ndown;
    }
}

/* ---- states: the only writers of opened, up, down ------------------------ */

static void stream_end(struct pump *p, struct mstream *s, int reason, int err,
                       int code, int tell_agent);

/* Our own impossible change (never a peer's doing: those are checked where
   frames are parsed). As conn.c's refuse(): said on stderr, abort() in a
   PUMP_DEBUG build, else this stream alone is cut with PUMP_END_STATE. */
static int mrefuse(struct pump *p, struct mstream *s, const char *what,
                   int from, int to)
{
    fprintf(stderr, "sshpump pump: mux stream %d: %s %d -> %d refused "
            "(impossible state change)\n", s->slot, what, from, to);
#ifdef PUMP_DEBUG
    abort();
#endif
    stream_end(p, s, PUMP_END_STATE, 0, 0, 1);
    return -1;
}

static int set_opened(struct pump *p, struct mstream *s)
{
    if (s->opened != OPENING)
        return mrefuse(p, s, "opened", s->opened, OPENED);
    s->opened = OPENED;
    return 0;
}

static int mset_up(struct pump *p, struct mstream *s, int to)
{
    if (to != s->up + 1)
        return mrefuse(p, s, "up", s->up, to);
    s->up = to;
    return 0;
}

static int mset_down(struct pump *p, struct mstream *s, int to)
{
    if (to != s->down + 1)
        return mrefuse(p, s, "down", s->down, to);
    s->down = to;
    return 0;
}

/* ---- streams: table, ending ----------------------------------------------- */

/* Close a stream's client: reset (SO_LINGER 0, a TCP RST) when it was cut,
   else a normal close that delivers what is queued (as conn.c's
   client_close, for a stream's fd). */
static void close_client(struct pump *p, int fd, int reset)
{
    const struct linger lg = {.l_onoff = reset, .l_linger = 0};
    epoll_ctl(p->epfd, EPOLL_CTL_DEL, fd, NULL);
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(fd);
}

static struct mstream *by_sid(struct mux *m, uint32_t sid)
{
    int slot = (int)(sid & (MAX_SLOTS - 1));
    struct mstream *s;
    if (slot >= m->cap || !(s = m->s[slot]) || s->sid != sid)
        return NULL;
    return s;
}

static void owe(struct mux *m, struct mstream *s, unsigned what)
{
    s->need |= what;
    if (!s->in_ctl && q_push(&m->ctl, s->slot) == 0)
        s->in_ctl = 1;
}

static void want_down(struct mux *m, struct mstream *s)
{
    if (!s->in_down && q_push(&m->down, s->slot) == 0)
        s->in_down = 1;
}

static void want_read(struct mux *m, struct mstream *s)
{
    if (!s->in_ready && q_push(&m->ready, s->slot) == 0)
        s->in_ready = 1;
}

/* The stream is over: the client closed (reset if cut), the agent told
   (RESET) if it knows the stream and did not end it itself, reported. */
static void stream_end(struct pump *p, struct mstream *s, int reason, int err,
                       int code, int tell_agent)
{
    struct mux *m = p->mux;
    if (tell_agent && !(s->need & NEED_OPEN) && m->ch) {
        if (m->nresets == m->resets_cap) {
            int ncap = m->resets_cap ? m->resets_cap * 2 : 64;
            uint32_t *nr = realloc(m->resets, (size_t)ncap * sizeof(*nr));
            if (nr) {
                m->resets = nr;
                m->resets_cap = ncap;
            }
        }
        if (m->nresets < m->resets_cap)
            m->resets[m->nresets++] = s->sid;
    }
    close_client(p, s->fd, reason != PUMP_END_NORMAL);
    if (s->dbuf) {
        p->buffered -= s->dlen - s->doff;
        p->buffers--;
        free(s->dbuf);
    }
    push_event(m, PUMP_EV_DONE, s, reason, err, code);
    m->s[s->slot] = NULL;
    m->free_slots[m->nfree++] = s->slot;
    m->live--;
    free(s->target);
    free(s);
}

/* ---- the client side of one stream ---------------------------------------- */

/* Deliver what we hold to the client; credit it back; pass EOF on. Returns
   non-zero on progress; s may be freed (then 1). */
static int stream_down(struct pump *p, struct mstream *s)
{
    struct mux *m = p->mux;
    int moved = 0;
    while (s->dlen > s->doff && s->wr_ready) {
        ssize_t w = send(s->fd, s->dbuf + s->doff, s->dlen - s->doff,
                         MSG_NOSIGNAL);
        if (w > 0) {
            s->doff += (size_t)w;
            s->ndown += (unsigned long long)w;
            s->owed += (unsigned long)w;
            p->buffered -= (size_t)w;
            moved = 1;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            s->wr_ready = 0;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else {
            stream_end(p, s, PUMP_END_CLIENT_ERROR, w < 0 ? errno : EPIPE, 0, 1);
            return 1;
        }
    }
    if (s->dbuf && s->doff == s->dlen) {
        p->buffers--;
        free(s->dbuf);  /* idle streams hold no buffer */
        s->dbuf = NULL;
        s->doff = s->dlen = 0;
    }
    /* Credit goes back in quarters of the window (one WINDOW frame per
       256 KiB, not one per DATA frame); the agent's credit never runs out,
       as at least 3/4 of it is back once the client has everything. */
    if (s->owed >= PUMP_MUX_WINDOW / 4 && s->down == DOWN_OPEN)
        owe(m, s, NEED_WINDOW);
    if (s->down == DOWN_DRAIN && !s->dbuf) {
        shutdown(s->fd, SHUT_WR);
        if (mset_down(p, s, DOWN_DONE) < 0)
            return 1;
        moved = 1;
    }
    if (s->up == UP_DONE && s->down == DOWN_DONE && s->agent_closed) {
        stream_end(p, s, PUMP_END_NORMAL, 0, 0, 0);
        return 1;
    }
    return moved;
}

/* One DATA frame for s: to the client at once if it takes it, the rest into
   s's buffer (bounded by the window we granted). 0, or -1 on a protocol
   error (the agent sent beyond its credit). */
static int stream_data(struct pump *p, struct mstream *s, const char *b,
                       size_t len)
{
    size_t held = s->dbuf ? s->dlen - s->doff : 0;
    if (s->down != DOWN_OPEN || held + len > PUMP_MUX_WINDOW)
        return -1;
    if (!held && s->wr_ready) {
        ssize_t w;
        do
            w = send(s->fd, b, len, MSG_NOSIGNAL);
        while (w < 0 && errno == EINTR);
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            stream_end(p, s, PUMP_END_CLIENT_ERROR, errno, 0, 1);
            return 0;
        }
        if (w < 0)
            w = 0;
        if ((size_t)w < len)
            s->wr_ready = 0;
        s->ndown += (unsigned long long)w;
        s->owed += (unsigned long)w;
        b += w;
        len -= (size_t)w;
    }
    if (len) {
        if (!s->dbuf) {
            s->dbuf = malloc(PUMP_MUX_WINDOW);
            if (!s->dbuf) {
                stream_end(p, s, PUMP_END_CLIENT_ERROR, ENOMEM, 0, 1);
                return 0;
            }
            p->buffers++;
            s->doff = s->dlen = 0;
        } else if (s->dlen + len > PUMP_MUX_WINDOW) {
            memmove(s->dbuf, s->dbuf + s->doff, s->dlen - s->doff);
            s->dlen -= s->doff;
            s->doff = 0;
        }
        memcpy(s->dbuf + s->dlen, b, len);
        s->dlen += len;
        p->buffered += len;
    }
    want_down(p->mux, s);
    return 0;
}

/* ---- the lane: frames in --------------------------------------------------- */

static void lane_lost(struct pump *p, int err);

/* One frame from the agent. 0, or -1 on a protocol error. */
static int frame_in(struct pump *p, int type, uint32_t sid, const char *b,
                    uint32_t len)
{
    struct mux *m = p->mux;
    struct mstream *s = by_sid(m, sid);
    if (type == F_PONG)
        return 0;
    if (!s)
        return type >= F_OPEN_OK && type <= F_RESET ? 0 : -1; /* stray: a cut stream */
    switch (type) {
    case F_OPEN_OK:
        if (set_opened(p, s) == 0)
            push_event(m, PUMP_EV_OPENED, s, 0, 0, 0);
        return 0;
    case F_OPEN_FAIL:
        if (len < 5 || s->opened != OPENING)
            return -1;
        stream_end(p, s, PUMP_END_OPEN_FAILED, (int)get32(b + 1),
                   (unsigned char)b[0], 0);
        return 0;
    case F_DATA:
        return stream_data(p, s, b, len);
    case F_WINDOW:
        if (s->credit <= 0 && s->up == UP_OPEN)
            want_read(m, s);
        s->credit += len;
        return 0;
    case F_EOF:
        if (s->down != DOWN_OPEN)
            return -1;
        if (mset_down(p, s, DOWN_DRAIN) == 0)
            want_down(m, s);
        return 0;
    case F_CLOSE:
        if (s->up != UP_DONE || s->down == DOWN_OPEN)
            return -1;
        s->agent_closed = 1;
        want_down(m, s);
        return 0;
    case F_RESET:
        stream_end(p, s, PUMP_END_RESET, 0, 0, 0);
        return 0;
    default:
        return -1;
    }
}

/* Parse every complete frame in the input buffer. 0, or -1 on a protocol
   error. */
static int frames_in(struct pump *p)
{
    struct mux *m = p->mux;
    size_t pos = 0;
    int bad = 0;
    while (m->ilen - pos >= HDR && !bad) {
        const char *h = m->in + pos;
        int type = (unsigned char)h[1];
        uint32_t sid = get32(h + 4), len = get32(h + 8);
        int payload = type == F_OPEN_FAIL || type == F_DATA;
        size_t need = HDR + (payload ? len : 0);
        if (h[0] != MUX_VERSION || need > MAX_IN_FRAME) {
            bad = 1;
            break;
        }
        if (m->ilen - pos < need)
            break;
        bad = frame_in(p, type, sid, h + HDR, len) < 0;
        pos += need;
    }
    if (pos) {
        memmove(m->in, m->in + pos, m->ilen - pos);
        m->ilen -= pos;
    }
    return bad ? -1 : 0;
}

/* Read the lane while it has data. Non-zero on progress. */
static int lane_read(struct pump *p)
{
    struct mux *m = p->mux;
    int moved = 0;
    while (m->ch && !p->dead) {
        unsigned long avail = 0;
        ssize_t r;
        libssh2_channel_window_read_ex(m->ch, &avail, NULL);
        if (avail == 0 && !m->rpending) {
            /* Let libssh2 read the socket (wait_eof reads until EAGAIN and
               sends nothing), then look again. */
            int e = libssh2_channel_wait_eof(m->ch);
            if (e < 0 && e != LIBSSH2_ERROR_EAGAIN) {
                session_failed(p, e);
                break;
            }
            libssh2_channel_window_read_ex(m->ch, &avail, NULL);
            if (avail == 0) {
                if (libssh2_channel_eof(m->ch) == 1)
                    lane_lost(p, 0);  /* the agent exited */
                break;
            }
        }
        /* Always the same length (flow.c's top comment); the buffer always
           has room, as frames are consumed as soon as they are complete. */
        r = libssh2_channel_read_ex(m->ch, 0, m->in + m->ilen, p->read_chunk);
        if (r == LIBSSH2_ERROR_EAGAIN) {
            m->rpending = 1;
            p->out_blocked = 1;
            break;
        }
        m->rpending = 0;
        if (r == 0) {
            if (libssh2_channel_eof(m->ch) == 1)
                lane_lost(p, 0);
            break;  /* only stderr was pending: Python reads it at the end */
        }
        if (r < 0) {
            lane_lost(p, (int)r);
            break;
        }
        m->ilen += (size_t)r;
        moved = 1;
        if (frames_in(p) < 0) {
            lane_lost(p, -EPROTO);
            break;
        }
    }
    return moved;
}

/* ---- the lane: frames out -------------------------------------------------- */

static size_t out_room(struct mux *m)
{
    return OUT_CAP - m->olen;
}

/* Owed control frames (and RESETs) into the output, in the order owed. */
static int control_out(struct pump *p)
{
    struct mux *m = p->mux;
    int i, k = 0, moved = 0;
    while (m->nresets && out_room(m) >= HDR) {
        put_header(m->out + m->olen, F_RESET, m->resets[--m->nresets], 0);
        m->olen += HDR;
        moved = 1;
    }
    for (i = 0; i < m->ctl.n; i++) {
        int slot = m->ctl.v[i];
        struct mstream *s = slot < m->cap ? m->s[slot] : NULL;
        if (!s || !s->in_ctl)
            continue;
        if (out_room(m) < 3 * HDR + s->tlen) {
            m->ctl.v[k++] = slot;  /* no room now: keeps its place */
            continue;
        }
        if (s->need & NEED_OPEN) {
            put_header(m->out + m->olen, F_OPEN, s->sid, s->tlen);
            memcpy(m->out + m->olen + HDR, s->target, s->tlen);
            m->olen += HDR + s->tlen;
            free(s->target);
            s->target = NULL;
            s->tlen = 0;
        }
        if ((s->need & NEED_WINDOW) && s->owed) {
            put_header(m->out + m->olen, F_WINDOW, s->sid, (uint32_t)s->owed);
            m->olen += HDR;
            s->owed = 0;
        }
        if (s->need & NEED_EOF) {
            put_header(m->out + m->olen, F_EOF, s->sid, 0);
            m->olen += HDR;
            if (mset_up(p, s, UP_DONE) < 0)
                continue;
        }
        s->need = 0;
        s->in_ctl = 0;
        moved = 1;
        if (s->up == UP_DONE && s->down == DOWN_DONE && s->agent_closed)
            want_down(m, s);
    }
    m->ctl.n = k;
    return moved;
}

/* One pass of DATA: one chunk from each ready client in turn, straight into
   the output behind its header, while credit and room last. Non-zero on
   progress. */
static int data_pass(struct pump *p)
{
    struct mux *m = p->mux;
    int n = m->ready.n, i, moved = 0;
    for (i = 0; i < n; i++) {
        int slot = m->ready.v[i];
        struct mstream *s = slot < m->cap ? m->s[slot] : NULL;
        size_t want;
        ssize_t r;
        if (!s || !s->in_ready)
            continue;
        if (s->up != UP_OPEN || !s->rd_ready || s->credit <= 0 ||
            (s->need & NEED_OPEN)) {
            /* Nothing to read now; the client's next event, the agent's
               WINDOW or the OPEN going out puts it back. */
            s->in_ready = 0;
            if (s->need & NEED_OPEN)
                s->in_ready = q_push(&m->ready, slot) == 0;
            continue;
        }
        if (out_room(m) < HDR + 1024) {
            if (q_push(&m->ready, slot) < 0)
                s->in_ready = 0;
            continue;
        }
        want = out_room(m) - HDR;
        if (want > CHUNK)
            want = CHUNK;
        if (want > (size_t)s->credit)
            want = (size_t)s->credit;
        r = recv(s->fd, m->out + m->olen + HDR, want, 0);
        if (r > 0) {
            put_header(m->out + m->olen, F_DATA, s->sid, (uint32_t)r);
            m->olen += HDR + (size_t)r;
            s->credit -= r;
            s->nup += (unsigned long long)r;
            moved = 1;
            if (q_push(&m->ready, slot) < 0)
                s->in_ready = 0;
        } else if (r == 0) {
            s->in_ready = 0;
            if (mset_up(p, s, UP_DRAIN) == 0)
                owe(m, s, NEED_EOF);
            moved = 1;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            s->rd_ready = 0;
            s->in_ready = 0;
        } else if (errno == EINTR) {
            if (q_push(&m->ready, slot) < 0)
                s->in_ready = 0;
        } else {
            s->in_ready = 0;
            stream_end(p, s, PUMP_END_CLIENT_ERROR, errno, 0, 1);
            moved = 1;
        }
    }
    if (n) {
        memmove(m->ready.v, m->ready.v + n, (size_t)(m->ready.n - n) * sizeof(int));
        m->ready.n -= n;
    }
    return moved;
}

/* DATA passes until the output is full or no client has more: a single
   busy stream fills the buffer too, so that the lane's writes are whole
   packets (MAX_WRITE) rather than one frame each. */
static int data_out(struct pump *p)
{
    struct mux *m = p->mux;
    int moved = 0;
    while (m->ready.n && out_room(m) >= HDR + 1024 && data_pass(p))
        moved = 1;
    return moved;
}

/* The output buffer into the lane, a few packets per round. */
static int lane_write(struct pump *p)
{
    struct mux *m = p->mux;
    int packets, moved = 0;
    for (packets = 0; m->ch && m->olen > m->ooff && !p->dead; packets++) {
        size_t len;
        ssize_t w;
        if (!m->wpending && (p->owed > 0 || packets == LANE_PACKETS)) {
            moved = 1;  /* an adjust goes first, or others get a turn */
            break;
        }
        if (!m->wpending && libssh2_channel_window_write_ex(m->ch, NULL) == 0)
            break;  /* the server's window for the lane is closed */
        len = m->wpending ? m->wlen : m->olen - m->ooff;
        if (len > MAX_WRITE)
            len = MAX_WRITE;
        w = libssh2_channel_write_ex(m->ch, 0, m->out + m->ooff, len);
        if (w > 0) {
            m->ooff += (size_t)w;
            m->wpending = 0;
            moved = 1;
        } else if (w == LIBSSH2_ERROR_EAGAIN) {
            m->wpending = 1;
            m->wlen = len;
            p->out_blocked = 1;
            break;
        } else if (w == 0) {
            break;
        } else if (w == LIBSSH2_ERROR_CHANNEL_CLOSED ||
                   w == LIBSSH2_ERROR_CHANNEL_EOF_SENT) {
            lane_lost(p, (int)w);
            break;
        } else {
            session_failed(p, (int)w);
            break;
        }
    }
    if (!m->wpending && m->ooff) {
        memmove(m->out, m->out + m->ooff, m->olen - m->ooff);
        m->olen -= m->ooff;
        m->ooff = 0;
    }
    return moved;
}

/* ---- the lane's end --------------------------------------------------------- */

/* Every stream is cut with reason, the lane forgotten (Python owns and
   frees the channel). */
static void end_all(struct pump *p, int reason, int err)
{
    struct mux *m = p->mux;
    int i;
    for (i = 0; i < m->cap; i++)
        if (m->s[i])
            stream_end(p, m->s[i], reason, err, 0, 0);
    m->nresets = 0;
    m->ready.n = m->ctl.n = m->down.n = 0;
}

static void lane_lost(struct pump *p, int err)
{
    struct mux *m = p->mux;
    if (!m->ch)
        return;
    m->ch = NULL;
    m->lost = 1;
    end_all(p, PUMP_END_LANE_LOST, err);
    m->ooff = m->olen = m->ilen = 0;
    m->wpending = m->rpending = 0;
    push_event(m, PUMP_EV_LANE_LOST, NULL, 0, err, 0);
}

/* ---- what pump.c calls -------------------------------------------------------- */

void mux_client_event(struct pump *p, int slot, unsigned events)
{
    struct mux *m = p->mux;
    struct mstream *s;
    if (!m || slot >= m->cap || !(s = m->s[slot]))
        return;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        s->rd_ready = 1;
        if (s->up == UP_OPEN)
            want_read(m, s);
    }
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) {
        s->wr_ready = 1;
        want_down(m, s);
    }
}

int mux_step(struct pump *p)
{
    struct mux *m = p->mux;
    int moved = 0, i, n;
    if (!m || !m->ch)
        return 0;
    moved |= lane_read(p);
    n = m->down.n;
    for (i = 0; i < n && m->ch; i++) {
        int slot = m->down.v[i];
        struct mstream *s = slot < m->cap ? m->s[slot] : NULL;
        if (!s || !s->in_down)
            continue;
        s->in_down = 0;
        moved |= stream_down(p, s);
    }
    if (n && m->down.n >= n) {
        memmove(m->down.v, m->down.v + n, (size_t)(m->down.n - n) * sizeof(int));
        m->down.n -= n;
    }
    if (m->ch) {
        moved |= lane_write(p);
        moved |= control_out(p);
        moved |= data_out(p);
        moved |= lane_write(p);
    }
    return moved;
}

int mux_wants_input(struct pump *p)
{
    return p->mux && p->mux->ch;
}

int mux_busy(struct pump *p)
{
    struct mux *m = p->mux;
    return m && m->ch && (m->olen > m->ooff || m->ctl.n || m->nresets ||
                          m->down.n || m->rpending);
}

int mux_pop_event(struct pump *p, struct pump_event *e)
{
    struct mux *m = p->mux;
    if (!m || m->evhead == m->nev)
        return 0;
    *e = m->evq[m->evhead++];
    if (m->evhead == m->nev)
        m->evhead = m->nev = 0;
    return 1;
}

void mux_abort(struct pump *p, int conn, int err)
{
    struct mux *m = p->mux;
    int i;
    if (!m)
        return;
    for (i = 0; i < m->cap; i++) {
        struct mstream *s = m->s[i];
        if (s && (conn < 0 || conn == PUMP_MUX_BASE + i))
            stream_end(p, s, PUMP_END_ABORTED, err, 0, !err);
    }
}

int mux_conn_stats(struct pump *p, int conn, struct pump_conn_stats *out)
{
    struct mux *m = p->mux;
    struct mstream *s;
    int slot = conn - PUMP_MUX_BASE;
    if (!m || slot < 0 || slot >= m->cap || !(s = m->s[slot]))
        return -1;
    out->up = s->nup;
    out->down = s->ndown;
    out->buffered_up = 0;  /* client bytes go straight into the lane's output */
    out->buffered_down = s->dbuf ? s->dlen - s->doff : 0;
    out->up_state = s->up;
    out->down_state = s->down;
    return 0;
}

void mux_free(struct pump *p)
{
    struct mux *m = p->mux;
    int i;
    if (!m)
        return;
    for (i = 0; i < m->cap; i++) {
        struct mstream *s = m->s[i];
        if (!s)
            continue;
        close_client(p, s->fd, 1);  /* still open when the pump goes: cut */
        free(s->dbuf);
        free(s->target);
        free(s);
    }
    free(m->s);
    free(m->gen);
    free(m->free_slots);
    free(m->ready.v);
    free(m->ctl.v);
    free(m->down.v);
    free(m->resets);
    free(m->out);
    free(m->in);
    free(m->evq);
    free(m);
    p->mux = NULL;
}

/* ---- the public calls -------------------------------------------------------- */

int pump_mux_start(struct pump *p, void *channel)
{
    struct mux *m = p->mux;
    if (!m) {
        m = calloc(1, sizeof(*m));
        if (!m)
            return -ENOMEM;
        m->out = malloc(OUT_CAP);
        m->icap = p->read_chunk + MAX_IN_FRAME;
        m->in = malloc(m->icap);
        if (!m->out || !m->in) {
            free(m->out);
            free(m->in);
            free(m);
            return -ENOMEM;
        }
        p->mux = m;
    }
    if (m->ch)
        return -EBUSY;
    m->ch = channel;
    m->lost = 0;
    return 0;
}

int pump_mux_open(struct pump *p, int fd, const char *target, unsigned int len)
{
    struct mux *m = p->mux;
    struct mstream *s;
    struct epoll_event ev;
    int slot;
    if (!m || !m->ch)
        return -ENOTCONN;
    if (m->nfree > 0) {
        slot = m->free_slots[--m->nfree];
    } else {
        if (m->cap == MAX_SLOTS)
            return -EMFILE;
        if (m->cap % 256 == 0) {
            int ncap = m->cap + 256;
            struct mstream **ns = realloc(m->s, (size_t)ncap * sizeof(*ns));
            uint16_t *ng;
            int *nf;
            if (!ns)
                return -ENOMEM;
            m->s = ns;
            ng = realloc(m->gen, (size_t)ncap * sizeof(*ng));
            if (!ng)
                return -ENOMEM;
            m->gen = ng;
            nf = realloc(m->free_slots, (size_t)ncap * sizeof(*nf));
            if (!nf)
                return -ENOMEM;
            m->free_slots = nf;
        }
        slot = m->cap++;
        m->s[slot] = NULL;
        m->gen[slot] = 0;
    }
    s = calloc(1, sizeof(*s));
    if (s)
        s->target = malloc(len ? len : 1);
    if (!s || !s->target) {
        if (s)
            free(s);
        m->free_slots[m->nfree++] = slot;
        return -ENOMEM;
    }
    memcpy(s->target, target, len);
    s->tlen = len;
    /* A new id for the slot: frames still in flight for its previous
       stream name the old one and are ignored. */
    m->gen[slot] = (uint16_t)(m->gen[slot] % 4095 + 1);
    s->slot = slot;
    s->sid = (uint32_t)m->gen[slot] << SLOT_BITS | (uint32_t)slot;
    s->fd = fd;
    s->credit = PUMP_MUX_WINDOW;
    s->rd_ready = s->wr_ready = 1;
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = MUX_TAG | (unsigned)slot;
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int e = errno;
        free(s->target);
        free(s);
        m->free_slots[m->nfree++] = slot;
        return -e;
    }
    m->s[slot] = s;
    m->live++;
    owe(m, s, NEED_OPEN);
    want_read(m, s);  /* data may follow OPEN at once */
    return PUMP_MUX_BASE + slot;
}

int pump_mux_live(struct pump *p)
{
    return p->mux ? p->mux->live : 0;
}
