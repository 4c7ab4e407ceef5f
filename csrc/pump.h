/*
 * The pump's public interface. This file is the single source of these
 * declarations: build_pump.py feeds it to cffi's cdef, the C includes it.
 * It must stay plain C that cffi can parse (no #include, no macros with
 * expressions).
 */

struct pump;

/* Event kinds returned by pump_run(). */
enum {
    PUMP_EV_DONE = 1,         /* a connection finished; fd closed by the pump */
    PUMP_EV_SESSION_DEAD = 2, /* the SSH session failed; err = libssh2 code */
    PUMP_EV_OPENED = 3,       /* --mux: the agent connected a stream's target */
    PUMP_EV_LANE_LOST = 4     /* --mux: the agent's channel ended (its streams
                                 got DONE first); err = 0 (agent exited),
                                 -EPROTO (bad frames) or a libssh2 code */
};

/* Why a connection ended (PUMP_EV_DONE.reason). */
enum {
    PUMP_END_NORMAL = 0,        /* both directions finished, every byte delivered */
    PUMP_END_CLIENT_ERROR = 1,  /* client socket reset or send failed */
    PUMP_END_CHANNEL_CLOSED = 2,/* server closed the channel with data pending */
    PUMP_END_CHANNEL_ERROR = 3, /* libssh2 refused a channel operation */
    PUMP_END_ABORTED = 4,       /* closed by pump_abort() / session death */
    PUMP_END_STATE = 5,         /* pump bug: an impossible state change was
                                   refused (see refuse() in conn.c) */
    PUMP_END_OPEN_FAILED = 6,   /* --mux: the agent could not connect the target;
                                   code = SSH open-failure reason, err = errno */
    PUMP_END_RESET = 7,         /* --mux: the target side reset the stream */
    PUMP_END_LANE_LOST = 8      /* --mux: the agent's channel ended */
};

/* --mux: stream ids in events are PUMP_MUX_BASE + slot; each stream's credit
   window, both ways, equals the agent's INITIAL_WINDOW. */
enum {
    PUMP_MUX_BASE = 16777216,
    PUMP_MUX_WINDOW = 1048576
};

/* State of one direction of a connection (pump_conn_stats). Each direction
   goes OPEN -> DRAIN -> DONE; CLOSING means the whole connection is closing
   its channel and neither direction moves any more. */
enum {
    PUMP_STATE_OPEN = 0,     /* passing bytes */
    PUMP_STATE_DRAIN = 1,    /* the sender sent EOF; flushing what we hold */
    PUMP_STATE_DONE = 2,     /* EOF passed on */
    PUMP_STATE_CLOSING = 3
};

struct pump_event {
    int kind;
    int conn;                    /* connection id from pump_add() */
    int reason;                  /* PUMP_END_* */
    int err;                     /* errno or libssh2 error code, 0 if none */
    unsigned long long up;       /* bytes client -> channel */
    unsigned long long down;     /* bytes channel -> client */
    int code;                    /* PUMP_END_OPEN_FAILED: SSH reason code */
};

struct pump_stats {
    int conns;                       /* connections not yet finished */
    unsigned long long buffered;     /* bytes held in pump buffers */
    unsigned long long buffers;      /* buffers currently allocated */
    unsigned long long rx_bytes;     /* bytes received on the SSH socket */
    double last_rx;                  /* CLOCK_MONOTONIC seconds of last receive */
    int out_blocked;                 /* a send waits for the SSH socket */
};

/* One live connection, now. */
struct pump_conn_stats {
    unsigned long long up;             /* bytes client -> channel so far */
    unsigned long long down;           /* bytes channel -> client so far */
    unsigned long long buffered_up;    /* read from the client, not yet in the channel */
    unsigned long long buffered_down;  /* read from the channel, not yet sent to the client */
    int up_state;                      /* PUMP_STATE_* */
    int down_state;                    /* PUMP_STATE_* */
};

/* A pump for one libssh2 session whose socket is ssh_fd (non-blocking). */
struct pump *pump_new(void *session, int ssh_fd, unsigned int bufsize,
                      unsigned long window);
void pump_free(struct pump *p);
int pump_epoll_fd(struct pump *p);

/* Hand a connected client socket and its open channel to the pump.
   The pump owns fd from now on (closes it at the end); the caller keeps the
   channel's Python owner alive until PUMP_EV_DONE and then frees it.
   Returns a connection id >= 0 or -errno. */
int pump_add(struct pump *p, int fd, void *channel);

/* Move every byte that can move now. Fills up to max events; returns the
   number filled. Call when the epoll fd is readable and after any other
   libssh2 call on the session (it may have queued incoming packets). */
int pump_run(struct pump *p, struct pump_event *ev, int max);

/* Close one connection (or all, conn = -1) without waiting for its peer:
   the channel is closed politely if the session still works. DONE events
   follow from pump_run(). */
void pump_abort(struct pump *p, int conn, int session_dead);

/* Non-zero when a small control packet (keepalive, EOF) can be sent now
   without risking a partial send: no send is pending and the socket has room. */
int pump_can_send_small(struct pump *p);
/* Python sent something that returned EAGAIN: watch the socket for writing. */
void pump_want_out(struct pump *p);
/* Python waits for the server (a channel open in flight): watch for input
   even while no connection is open. */
void pump_want_in(struct pump *p, int on);
/* A session channel with no command, kept open so that the pump can read the
   SSH socket while no connection is open (server keepalives, rekeys). The
   caller keeps its Python owner alive; NULL to drop it. */
void pump_set_control(struct pump *p, void *channel);

void pump_get_stats(struct pump *p, struct pump_stats *st);
/* Fills *out for connection conn; 0, or -1 if conn is not live (never added,
   or already reported by PUMP_EV_DONE: its id may since name a new one). */
int pump_conn_stats(struct pump *p, int conn, struct pump_conn_stats *out);

/* --mux (mux.c). The agent's exec channel, its hello line checked by the
   caller, who keeps its Python owner alive until PUMP_EV_LANE_LOST or
   pump_free: 0, or -EBUSY while a lane is live. */
int pump_mux_start(struct pump *p, void *channel);
/* Carry client fd (owned by the pump from now) as a new stream to target
   (the OPEN payload: b"t" + port (2 bytes, big-endian) + host, or b"u" +
   path). Returns a conn id (>= PUMP_MUX_BASE) or -errno. Bytes the client
   sends follow the OPEN at once. */
int pump_mux_open(struct pump *p, int fd, const char *target, unsigned int len);
int pump_mux_live(struct pump *p);

/* For the pointer bridge's self-check. */
long pump_session_timeout(void *session);
unsigned long pump_channel_window_write(void *channel);
