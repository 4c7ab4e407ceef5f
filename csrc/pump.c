/*
 * The data plane: moves bytes between client sockets and libssh2 channels of
 * one SSH session, without calling back into Python per chunk.
 *
 * Every connection has two directions with their own state:
 *   up   (client -> channel): OPEN -> DRAIN (client sent EOF, flushing our
 *        buffer into the channel) -> DONE (channel EOF sent)
 *   down (channel -> client): OPEN -> DRAIN (channel EOF seen, flushing our
 *        buffer into the client) -> DONE (client shutdown(SHUT_WR))
 * When both are DONE the channel is closed (EOF + CLOSE, wait for the
 * server's CLOSE) and the connection is reported finished.
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
 *    reads always ask for READ_CHUNK bytes (channel_read derives the amount
 *    from the length), the transport is drained with calls that never
 *    adjust, and explicit adjusts remember their amount.
 *  - packets built on the stack (channel EOF, keepalive) are identified by
 *    their address when resumed, so they must never be left half-sent; they
 *    are only sent when no send is pending and the socket has room.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "libssh2_min.h"
#include "pump.h"

#define SSH_TAG 0xffffffffu  /* epoll data for the SSH socket */
#define MAX_ROUNDS 64         /* bound on work per pump_run() call */
#define MAX_WRITE 32700       /* libssh2 sends at most this per call */
#define MIN_ADJUST 1024       /* LIBSSH2_CHANNEL_MINADJUST */
#define PACKETS_PER_ROUND 4   /* channel writes per connection per round */

enum { UP_OPEN, UP_DRAIN, UP_DONE };
enum { DOWN_OPEN, DOWN_DRAIN, DOWN_DONE };

struct conn {
    int id;
    int fd;
    LIBSSH2_CHANNEL *ch;
    int up, down;
    int closing;          /* channel close in progress */
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
};

/* The one setter of a connection's owed window adjust (rpending: half-sent
   inside channel_read; wadj: our own, with its amount). p->owed counts the
   connections owing one: while any does, no connection starts a new channel
   write (step_up), so a download's adjusts are not starved by an upload
   that keeps the session's single send buffer full (a starved adjust closes
   the download's window: one direction then crawls while the other runs). */
static void set_owed(struct pump *p, struct conn *c, int rpending,
                     unsigned long wadj)
{
    int before = c->rpending || c->wadj;
    c->rpending = rpending;
    c->wadj = wadj;
    p->owed += (rpending || wadj) - before;
}

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
       after every read. */
    if (r > 0)
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
    if (p->live > 0 || p->want_in || p->control)
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

/* libssh2_channel_abort() (CLOSE without EOF) exists only in sshpump's patched
   libssh2 (csrc/libssh2-channel-abort.patch): looked up at run time, so the
   pump also runs on the stock library (SSHPUMP_LIBSSH2=stock), where a cut
   channel gets EOF + CLOSE like any other. */
typedef int (*channel_abort_fn)(LIBSSH2_CHANNEL *);
static channel_abort_fn channel_abort;

static void find_channel_abort(void)
{
    static int looked;
    if (looked)
        return;
    looked = 1;
    *(void **)&channel_abort = dlsym(RTLD_DEFAULT, "libssh2_channel_abort");
}

struct pump *pump_new(void *session, int ssh_fd, unsigned int bufsize,
                      unsigned long window)
{
    struct pump *p;
    struct epoll_event ev;

    tune_malloc_once();
    find_channel_abort();
    p = calloc(1, sizeof(*p));

    if (!p)
        return NULL;
    p->s = session;
    p->ssh_fd = ssh_fd;
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

static void conn_release_buffers(struct pump *p, struct conn *c)
{
    if (c->ubuf) {
        p->buffered -= c->ulen - c->uoff;
        p->buffers--;
        free(c->ubuf);
        c->ubuf = NULL;
    }
    if (c->dbuf) {
        p->buffered -= c->dlen - c->doff;
        p->buffers--;
        free(c->dbuf);
        c->dbuf = NULL;
    }
    c->uoff = c->ulen = c->doff = c->dlen = 0;
}

static void client_reset(struct pump *p, struct conn *c);

void pump_free(struct pump *p)
{
    int i;
    if (!p)
        return;
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

static void push_event(struct pump *p, int kind, struct conn *c, int err)
{
    struct pump_event *e;
    if (p->nev == p->evcap) {
        int ncap = p->evcap ? p->evcap * 2 : 64;
        struct pump_event *nq = realloc(p->evq, ncap * sizeof(*nq));
        if (!nq)
            return; /* out of memory: the event is lost, never the bytes */
        p->evq = nq;
        p->evcap = ncap;
    }
    e = &p->evq[p->nev++];
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

/* Close the client socket; reset: with SO_LINGER 0 (a TCP reset), else
   with lingering off (a normal close that delivers what is queued). */
static void client_close(struct pump *p, struct conn *c, int reset)
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
static void client_reset(struct pump *p, struct conn *c)
{
    client_close(p, c, 1);
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

static void session_failed(struct pump *p, int err)
{
    if (!p->dead)
        p->dead = err ? err : -1;
}

/* Stop moving data for c and start closing its channel. */
static void conn_abort(struct pump *p, struct conn *c, int reason, int err)
{
    if (c->closing)
        return;
    c->closing = 1;
    c->reason = reason;
    c->err = err;
    /* Undeliverable bytes are dropped now, except a write libssh2 may have
       half-sent: only the same call can finish that packet, and until it is
       finished every other send of the session fails. conn_close_step
       completes it first. */
    if (c->dbuf) {
        p->buffered -= c->dlen - c->doff;
        p->buffers--;
        free(c->dbuf);
        c->dbuf = NULL;
        c->doff = c->dlen = 0;
    }
    if (c->ubuf && !c->wpending) {
        p->buffered -= c->ulen - c->uoff;
        p->buffers--;
        free(c->ubuf);
        c->ubuf = NULL;
        c->uoff = c->ulen = 0;
    }
    client_reset(p, c);
}

static int can_send_small(struct pump *p)
{
    struct pollfd pfd = {.fd = p->ssh_fd, .events = POLLOUT};
    if (p->out_blocked)
        return 0;
    return poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLOUT);
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

/* Complete a window adjust that returned EAGAIN, with the amount its
   packet carries (see the top of this file). For an adjust started inside
   channel_read that is what _libssh2_channel_read computed from the same
   read length and the unchanged window. Returns 0 or a libssh2 error. */
static int finish_adjust(struct pump *p, struct conn *c)
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

/* Close the channel: EOF (if not sent), CLOSE, wait for the server's CLOSE.
   Returns 1 when the connection is finished. */
static int conn_close_step(struct pump *p, struct conn *c)
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
        p->buffered -= c->ulen - c->uoff;
        p->buffers--;
        free(c->ubuf);
        c->ubuf = NULL;
        c->uoff = c->ulen = 0;
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
    /* A cut connection closes its channel without EOF, so the server can
       tell a stream cut short from one that ended; a normal end, or one
       whose EOF is already out, closes as usual. */
    if (c->reason != PUMP_END_NORMAL && c->up != UP_DONE && channel_abort)
        r = channel_abort(c->ch);
    else
        r = libssh2_channel_close(c->ch);
    if (r == LIBSSH2_ERROR_EAGAIN) {
        if (libssh2_session_block_directions(p->s) &
            LIBSSH2_SESSION_BLOCK_OUTBOUND)
            p->out_blocked = 1;
        return 0;  /* waiting for the server's CLOSE, or for the socket */
    }
    /* Any other error: libssh2 has marked the channel closed anyway. */
    return 1;
}

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

/* client -> our buffer -> channel. Returns non-zero on progress. */
static int step_up(struct pump *p, struct conn *c)
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
            c->up = UP_DRAIN;
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
        free(c->ubuf);
        c->ubuf = NULL;
        c->uoff = c->ulen = 0;
        p->buffers--;
    }

    /* Client finished sending and everything is in the channel: EOF. */
    if (c->up == UP_DRAIN && c->ulen == c->uoff && !p->dead) {
        int r;
        if (!can_send_small(p)) {
            p->out_blocked = 1;
            return moved;
        }
        r = libssh2_channel_send_eof(c->ch);
        if (r == 0) {
            c->up = UP_DONE;
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

/* channel -> our buffer -> client. Returns non-zero on progress. */
static int step_down(struct pump *p, struct conn *c)
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
        if (c->dbuf && c->doff == c->dlen) {
            free(c->dbuf);
            c->dbuf = NULL;
            c->doff = c->dlen = 0;
            p->buffers--;
        }

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
            libssh2_channel_window_read_ex(c->ch, &avail, NULL);
            if (avail == 0 && !c->rpending) {
                if (libssh2_channel_eof(c->ch) == 1) {
                    c->down = DOWN_DRAIN;
                    moved = 1;
                }
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
                if (libssh2_channel_eof(c->ch) == 1) {
                    c->down = DOWN_DRAIN;
                    moved = 1;
                }
                break;
            }
            session_failed(p, (int)r);
            return 1;
        }
    }

    if (c->down == DOWN_DRAIN && c->dlen == c->doff) {
        shutdown(c->fd, SHUT_WR);
        c->down = DOWN_DONE;
        moved = 1;
    }
    return moved;
}

/* Returns non-zero if anything happened. */
static int conn_step(struct pump *p, struct conn *c)
{
    int moved;
    if (!c->closing) {
        moved = step_up(p, c);
        if (!c->closing && !p->dead)
            moved |= step_down(p, c);
        if (!c->closing && c->up == UP_DONE && c->down == DOWN_DONE) {
            c->closing = 1;
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
    if (conn_close_step(p, c)) {
        conn_finish(p, c);
        return 1;
    }
    return 0;
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

/* Work is pending that no new input will announce: buffered bytes, a send
   to repeat, an EOF to pass on, a close in progress. */
static int conn_busy(const struct conn *c)
{
    return c->closing || c->wpending || c->rpending || c->wadj ||
           c->ulen > c->uoff || c->dlen > c->doff || c->up == UP_DRAIN ||
           c->down == DOWN_DRAIN || (c->down == DOWN_DONE && c->up != UP_DONE);
}

int pump_run(struct pump *p, struct pump_event *out, int max)
{
    struct epoll_event evs[256];
    int n, i, k, start, round, filled, moved;

    n = epoll_wait(p->epfd, evs, 256, 0);
    for (i = 0; i < n; i++) {
        unsigned long long tag = evs[i].data.u64;
        if (tag == SSH_TAG) {
            if ((evs[i].events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) &&
                p->live == 0 && !p->control)
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
        for (i = 0; i < p->cap; i++) {
            struct conn *c = p->conns[i];
            if (!c)
                continue;
            if (!c->closing) {
                c->reason = PUMP_END_ABORTED;
                c->err = p->dead;
                client_reset(p, c);
            }
            conn_finish(p, c);
        }
        if (!p->dead_reported) {
            push_event(p, PUMP_EV_SESSION_DEAD, NULL, p->dead);
            p->dead_reported = 1;
        }
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

void pump_get_stats(struct pump *p, struct pump_stats *st)
{
    st->conns = p->live;
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
