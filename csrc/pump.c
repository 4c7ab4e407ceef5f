/*
 * The data plane: moves bytes between client sockets and libssh2 channels of
 * one SSH session, without calling back into Python per chunk.
 *
 * This file is the session's part: the epoll loop over the client sockets
 * and the SSH socket, the table of connections, the events returned to
 * Python, and what libssh2 is told about the socket. One connection is
 * conn.c (its states and their setters, buffers, cuts) and flow.c (its
 * bytes, each direction, and the channel close), whose top comment lists
 * the libssh2 facts all three files are built around. This file is the
 * top: it calls both (conn_step), and neither calls it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "pump_private.h"

#define SSH_TAG 0xffffffffu  /* epoll data for the SSH socket */
#define MAX_ROUNDS 64         /* bound on work per pump_run() call */

/* libssh2 calls our recv so that the pump knows when the server last spoke
   (keepalive replies included) without Python touching the socket. */
#define FD_TABLE 65536
static struct pump *pump_by_fd[FD_TABLE];

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static ssize_t counting_recv(libssh2_socket_t fd, void *buf, size_t len,
                             int flags, void **abstract)
{
    static const int one = 1;
    struct pump *p = fd >= 0 && fd < FD_TABLE ? pump_by_fd[fd] : NULL;
    ssize_t r;
    (void)abstract;
    /* libssh2 reads the socket until EAGAIN inside every channel_read and
       before every channel_write, so a round over many reads and writes made
       one failing recv() per call: 2 per packet sent under bulk upload, 1 per
       32 KiB read under download. Once a round has seen the socket empty,
       answer EAGAIN without the syscall until the next round; what arrives
       meanwhile keeps the (level-triggered) SSH socket readable, so the
       event loop calls pump_run() again. Outside pump_run() (opens and
       keepalives from Python) every recv is real. */
    if (p && p->rx_dry)
        return -EAGAIN;
    r = recv(fd, buf, len, flags);
    if (r < 0) {
        if (p && p->in_run && (errno == EAGAIN || errno == EWOULDBLOCK))
            p->rx_dry = 1;
        return -errno;  /* libssh2 expects -errno, like its own _libssh2_recv */
    }
    /* sshd leaves Nagle on for sessions without a tty, so a small packet
       (an open confirmation, a short reply) waits for our ACK of the
       previous one; with delayed ACKs that is up to 40 ms per exchange,
       and it is what makes tunnels collapse under connection churn. ACK at
       once instead. Linux clears QUICKACK by itself, so it is set again
       after every read. (Not for a session carried over a unix socketpair:
       ProxyCommand, ProxyJump.) */
    if (r > 0 && (!p || p->ssh_is_tcp))
        setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
    if (r > 0 && p) {
        p->rx_bytes += (unsigned long long)r;
        p->last_rx = now_mono();
    }
    return r;
}

static void set_ssh_interest(struct pump *p)
{
    /* Without a channel nothing drains the socket, so level-triggered EPOLLIN
       would spin; EPOLLRDHUP still reports a server that went away. */
    unsigned want = EPOLLRDHUP;
    if (p->live > 0 || p->want_in || p->control || mux_wants_input(p))
        want |= EPOLLIN;
    if (p->out_blocked)
        want |= EPOLLOUT;
    if (want != p->ssh_events) {
        struct epoll_event ev = {.events = want, .data.u64 = SSH_TAG};
        epoll_ctl(p->epfd, EPOLL_CTL_MOD, p->ssh_fd, &ev);
        p->ssh_events = want;
    }
}

/* libssh2 mallocs and frees a buffer of ~32 KiB for every packet it
   receives, and our per-connection buffers come and go with the traffic. With
   glibc's defaults the heap top is trimmed back to the kernel whenever such
   frees leave 128 KiB free there, and the next packets fault the pages in
   again: under bulk download that was ~8 % of a worker's profile (page
   faults and clear_page). Keep freed memory for reuse instead; heap buffers
   up to 4 MiB (our largest pump buffer is bounded by --window's effect on
   reads, far below). Process-wide, set once. */
static void tune_malloc_once(void)
{
    static int done;
    if (done)
        return;
    done = 1;
    mallopt(M_MMAP_THRESHOLD, 4 << 20);
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
}

struct pump *pump_new(void *session, int ssh_fd, unsigned int bufsize,
                      unsigned long window)
{
    struct pump *p;
    struct epoll_event ev;

    tune_malloc_once();
    conn_init_once();
    p = calloc(1, sizeof(*p));

    if (!p)
        return NULL;
    p->s = session;
    p->ssh_fd = ssh_fd;
    {
        int domain = 0;
        socklen_t dlen = sizeof(domain);
        p->ssh_is_tcp = getsockopt(ssh_fd, SOL_SOCKET, SO_DOMAIN, &domain, &dlen) == 0
                        && (domain == AF_INET || domain == AF_INET6);
    }
    p->bufsize = bufsize >= 8192 ? bufsize : 65536;
    p->read_chunk = p->bufsize / 2;
    p->window = window;
    p->last_rx = now_mono();
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (p->epfd < 0)
        goto fail;
    p->ssh_events = EPOLLRDHUP;
    ev.events = p->ssh_events;
    ev.data.u64 = SSH_TAG;
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, ssh_fd, &ev) < 0)
        goto fail_ep;
    if (ssh_fd >= 0 && ssh_fd < FD_TABLE)
        pump_by_fd[ssh_fd] = p;
    p->orig_recv = libssh2_session_callback_set2(
        p->s, LIBSSH2_CALLBACK_RECV, (libssh2_cb_generic *)counting_recv);
    return p;

fail_ep:
    close(p->epfd);
fail:
    free(p);
    return NULL;
}

void pump_free(struct pump *p)
{
    int i;
    if (!p)
        return;
    mux_free(p);
    for (i = 0; i < p->cap; i++) {
        struct conn *c = p->conns[i];
        if (!c)
            continue;
        client_reset(p, c);  /* still open when the pump goes: cut */
        conn_release_buffers(p, c);
        free(c);
    }
    if (p->ssh_fd >= 0 && p->ssh_fd < FD_TABLE && pump_by_fd[p->ssh_fd] == p)
        pump_by_fd[p->ssh_fd] = NULL;
    /* The session is ssh2-python's; give it back its own recv (libssh2
       would call a NULL one). */
    libssh2_session_callback_set2(p->s, LIBSSH2_CALLBACK_RECV, p->orig_recv);
    close(p->epfd);
    free(p->conns);
    free(p->free_ids);
    free(p->evq);
    free(p);
}

int pump_epoll_fd(struct pump *p)
{
    return p->epfd;
}

int pump_add(struct pump *p, int fd, void *channel)
{
    struct conn *c;
    struct epoll_event ev;
    int id;

    if (p->nfree > 0) {
        id = p->free_ids[--p->nfree];
    } else {
        if (p->cap % 64 == 0) {
            int ncap = p->cap + 64;
            struct conn **nc = realloc(p->conns, ncap * sizeof(*nc));
            int *nf;
            if (!nc)
                return -ENOMEM;
            p->conns = nc;
            nf = realloc(p->free_ids, ncap * sizeof(*nf));
            if (!nf)
                return -ENOMEM;
            p->free_ids = nf;
        }
        id = p->cap++;
        p->conns[id] = NULL;
    }
    c = calloc(1, sizeof(*c));
    if (!c) {
        p->free_ids[p->nfree++] = id;
        return -ENOMEM;
    }
    c->id = id;
    c->fd = fd;
    c->ch = channel;
    c->rd_ready = c->wr_ready = 1;
    c->hot = 1;
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = (unsigned)id;
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int e = errno;
        free(c);
        p->free_ids[p->nfree++] = id;
        return -e;
    }
    if (p->window) {
        /* Grow the receive window beyond libssh2's 2 MiB for long fat
           pipes; step_down sends it before the first read. */
        unsigned long initial = 0;
        libssh2_channel_window_read_ex(c->ch, NULL, &initial);
        if (p->window > initial)
            set_owed(p, c, 0, p->window - initial);
    }
    p->conns[id] = c;
    p->live++;
    set_ssh_interest(p);
    return id;
}

/* A new slot at the end of the event queue, or NULL when out of memory (the
   event is lost, never the bytes). */
static struct pump_event *new_event(struct pump *p)
{
    if (p->nev == p->evcap) {
        int ncap = p->evcap ? p->evcap * 2 : 64;
        struct pump_event *nq = realloc(p->evq, ncap * sizeof(*nq));
        if (!nq)
            return NULL;
        p->evq = nq;
        p->evcap = ncap;
    }
    return &p->evq[p->nev++];
}

static void push_event(struct pump *p, int kind, struct conn *c, int err)
{
    struct pump_event *e = new_event(p);
    if (!e)
        return;
    memset(e, 0, sizeof(*e));
    e->kind = kind;
    e->err = err;
    if (c) {
        e->conn = c->id;
        e->reason = c->reason;
        e->up = c->nup;
        e->down = c->ndown;
    } else {
        e->conn = -1;
    }
}

/* The connection is over: close the client, report, recycle the id. */
static void conn_finish(struct pump *p, struct conn *c)
{
    /* Still open here means both directions ended normally (a cut has
       reset it already). The master armed every client with SO_LINGER 0,
       so that a worker killed outright resets its clients (the kernel's
       close then sends RST); disarm it for a normal close, which must
       deliver what is still queued. */
    client_close(p, c, 0);
    conn_release_buffers(p, c);
    set_owed(p, c, 0, 0);
    push_event(p, PUMP_EV_DONE, c, c->err);
    p->conns[c->id] = NULL;
    p->free_ids[p->nfree++] = c->id;
    p->live--;
    free(c);
}

/* ---- one connection, one round ------------------------------------------ */

/* Returns non-zero if anything happened. c is freed when it finished. */
static int conn_step(struct pump *p, struct conn *c)
{
    int moved;
    if (!c->closing) {
        moved = step_up(p, c);
        if (!c->closing && !p->dead)
            moved |= step_down(p, c);
        /* Both EOFs passed on: close normally. */
        if (!c->closing && c->up == UP_DONE && c->down == DOWN_DONE) {
            set_closing(p, c, PUMP_END_NORMAL, 0);
            moved = 1;
        }
        /* The server closed the channel while the client still sends:
           those bytes have nowhere to go. */
        if (!c->closing && c->down == DOWN_DONE && c->up != UP_DONE &&
            !p->dead && libssh2_channel_wait_closed(c->ch) == 0) {
            conn_abort(p, c,
                       c->ulen > c->uoff ? PUMP_END_CHANNEL_CLOSED
                                         : PUMP_END_NORMAL,
                       0);
            moved = 1;
        }
        if (!c->closing)
            return moved;
    }
    if (step_close(p, c)) {
        conn_finish(p, c);
        return 1;
    }
    return 0;
}

int pump_can_send_small(struct pump *p)
{
    return !p->dead && can_send_small(p);
}

void pump_want_out(struct pump *p)
{
    p->out_blocked = 1;
    set_ssh_interest(p);
}

/* Let libssh2 read everything the socket holds, so that read_avail, EOF and
   window adjusts are current for every channel. channel_wait_eof on a
   channel without EOF reads the transport until EAGAIN and sends nothing
   (no window adjust, unlike a zero-length channel_read). */
static void drain_transport(struct pump *p)
{
    int i, r;
    for (i = 0; i < p->cap; i++) {
        struct conn *c = p->conns[i];
        if (!c || c->closing || c->down != DOWN_OPEN)
            continue;
        r = libssh2_channel_wait_eof(c->ch);
        if (r == LIBSSH2_ERROR_EAGAIN)
            return;
        if (r < 0) {
            session_failed(p, r);
            return;
        }
        /* r == 0: this channel is at EOF and may not have read; next one. */
    }
    /* No connection could do it: the control channel reads for the session,
       so that the server's keepalives and rekeys get their answers. */
    if (p->control) {
        r = libssh2_channel_wait_eof(p->control);
        if (r < 0 && r != LIBSSH2_ERROR_EAGAIN)
            session_failed(p, r);
        else if (r == 0)
            p->control = NULL;  /* the server closed it; fall back */
    }
}

int pump_run(struct pump *p, struct pump_event *out, int max)
{
    struct epoll_event evs[256];
    int n, i, k, start, round, filled, moved;

    n = epoll_wait(p->epfd, evs, 256, 0);
    for (i = 0; i < n; i++) {
        unsigned long long tag = evs[i].data.u64;
        if (tag & MUX_TAG) {
            mux_client_event(p, (int)(tag & 0xffffffffu), evs[i].events);
            continue;
        }
        if (tag == SSH_TAG) {
            if ((evs[i].events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) &&
                p->live == 0 && !p->control && !mux_wants_input(p))
                session_failed(p, -13 /* LIBSSH2_ERROR_SOCKET_DISCONNECT */);
            continue;
        }
        if (tag < (unsigned)p->cap && p->conns[tag]) {
            struct conn *c = p->conns[tag];
            if (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                c->rd_ready = 1;
            if (evs[i].events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
                c->wr_ready = 1;
            c->hot = 1;
        }
    }

    p->out_blocked = 0;
    p->in_run = 1;
    for (round = 0; round < MAX_ROUNDS && !p->dead; round++) {
        int progress = 0;
        int full;
        p->rx_dry = 0;  /* each round looks at the socket again */
        drain_transport(p);
        /* Channel data, EOF and window adjusts only come in through the SSH
           socket, and libssh2 cannot say for which channels: when the server
           sent something, look at every connection. Otherwise only at those
           with client events or work in progress ("hot"). Thousands of idle
           connections then cost nothing on client-side wakeups. */
        full = p->rx_bytes != p->rx_scanned;
        p->rx_scanned = p->rx_bytes;
        /* Each round starts one connection further: none is always first
           at the session's send buffer. */
        start = p->cap ? (int)(p->rr++ % (unsigned)p->cap) : 0;
        for (k = 0; k < p->cap && !p->dead; k++) {
            struct conn *c;
            i = (start + k) % p->cap;
            c = p->conns[i];
            if (!c || (!full && !c->hot))
                continue;
            moved = conn_step(p, c);
            if (p->conns[i] == c)  /* not finished and freed */
                c->hot = moved || conn_busy(c);
            progress |= moved;
        }
        /* The --mux lane and its streams (mux.c): after the connections,
           which see every byte of the socket first only if the lane is not
           reading it in the same round; either order is correct. */
        if (!p->dead)
            progress |= mux_step(p);
        if (!progress)
            break;
    }
    if (round == MAX_ROUNDS) {
        /* More work is ready: make sure the loop calls us again soon. */
        p->out_blocked = 1;
    }
    p->in_run = 0;
    p->rx_dry = 0;

    if (p->dead) {
        mux_abort(p, -1, p->dead);
        for (i = 0; i < p->cap; i++) {
            struct conn *c = p->conns[i];
            if (!c)
                continue;
            conn_abort(p, c, PUMP_END_ABORTED, p->dead);  /* if still running */
            conn_finish(p, c);
        }
        if (!p->dead_reported) {
            push_event(p, PUMP_EV_SESSION_DEAD, NULL, p->dead);
            p->dead_reported = 1;
        }
    }
    {
        struct pump_event me, *e;
        while (mux_pop_event(p, &me) && (e = new_event(p)))
            *e = me;
    }
    set_ssh_interest(p);

    filled = p->nev < max ? p->nev : max;
    if (filled == 0)
        return 0;  /* evq may still be NULL */
    memcpy(out, p->evq, (size_t)filled * sizeof(*out));
    memmove(p->evq, p->evq + filled, (size_t)(p->nev - filled) * sizeof(*out));
    p->nev -= filled;
    return filled;
}

void pump_abort(struct pump *p, int conn, int session_dead)
{
    int i;
    if (session_dead)
        session_failed(p, -13 /* LIBSSH2_ERROR_SOCKET_DISCONNECT */);
    if (conn < 0 || conn >= PUMP_MUX_BASE)
        mux_abort(p, conn, p->dead);
    for (i = 0; i < p->cap; i++) {
        struct conn *c = p->conns[i];
        if (c && (conn < 0 || conn == i))
            conn_abort(p, c, PUMP_END_ABORTED, 0);
    }
}

void pump_set_control(struct pump *p, void *channel)
{
    p->control = channel;
    set_ssh_interest(p);
}

void pump_want_in(struct pump *p, int on)
{
    p->want_in = on;
    set_ssh_interest(p);
}

int pump_conn_stats(struct pump *p, int conn, struct pump_conn_stats *out)
{
    struct conn *c;
    if (conn >= PUMP_MUX_BASE)
        return mux_conn_stats(p, conn, out);
    if (conn < 0 || conn >= p->cap || !(c = p->conns[conn]))
        return -1;
    out->up = c->nup;
    out->down = c->ndown;
    out->buffered_up = c->ubuf ? c->ulen - c->uoff : 0;
    out->buffered_down = c->dbuf ? c->dlen - c->doff : 0;
    out->up_state = c->closing ? PUMP_STATE_CLOSING : c->up;
    out->down_state = c->closing ? PUMP_STATE_CLOSING : c->down;
    return 0;
}

void pump_get_stats(struct pump *p, struct pump_stats *st)
{
    st->conns = p->live + pump_mux_live(p);
    st->buffered = p->buffered;
    st->buffers = p->buffers;
    st->rx_bytes = p->rx_bytes;
    st->last_rx = p->last_rx;
    st->out_blocked = p->out_blocked;
}

long pump_session_timeout(void *session)
{
    return libssh2_session_get_timeout(session);
}

unsigned long pump_channel_window_write(void *channel)
{
    return libssh2_channel_window_write_ex(channel, NULL);
}
