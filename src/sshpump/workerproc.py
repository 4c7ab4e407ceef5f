"""Entry point of a worker process: ``python -m sshpump.workerproc FD``.

The master starts it with one end of a SOCK_SEQPACKET pair as FD, sends the
options (secrets included, never on argv or in the environment), then client
fds. The worker exits when the master goes away (control socket EOF, or
PR_SET_PDEATHSIG if the master is SIGKILLed) or after a drain, asked by the
master or by a SIGTERM/SIGINT of its own.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import statistics
import sys
from collections import deque

from . import wire
from .errors import AuthError, BridgeError, HostKeyError, MuxUnavailableError, SshpumpError, error_to_wire
from .procsetup import HANDLED_SIGNALS, raise_fd_limit, setup_logging
from .routes import Route
from .sessionpool import make_worker

EXIT_BOOT_ERROR = 3  # like gunicorn: the master must not respawn in a loop
REPORT_INTERVAL = 0.25  # seconds between open reports to the master (when there is news)
REPORT_PART = 150       # connections per status message (one datagram: well under wire.MAX_MESSAGE)

log = logging.getLogger("sshpump")


def _die_with_parent():
    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class OpenReport:
    """Tells the master how this worker's channel opens fare, so that it can
    send new clients elsewhere while this session stalls (a hung server or a
    network cut that keepalives have not declared dead yet): how long the
    oldest queued open has waited, and how long recent opens took. Sent at
    most every REPORT_INTERVAL, and only when there is something to say."""

    def __init__(self, send):
        self.send = send
        self.latencies: deque[float] = deque(maxlen=64)
        self.sent_wait = None

    def opened(self, latency: float):
        self.latencies.append(latency)

    def tick(self, wait: float | None):
        if wait is None and self.sent_wait is None and not self.latencies:
            return
        lat = statistics.median(self.latencies) if self.latencies else None
        self.latencies.clear()
        self.sent_wait = wait
        self.send("opens", wait=wait, lat=lat)


async def _serve(ctrl: socket.socket, opts, index: int, prefix: str = "") -> int:
    loop = asyncio.get_running_loop()
    stopped_event = asyncio.Event()

    def send(t, **msg):
        try:
            wire.send(ctrl, t, **msg)
        except OSError:  # the master is gone or not reading: it has no use for it
            pass

    def on_state(up, reason):
        send("up" if up else "down", reason=reason)

    # Connections finished (the master's load count) and clients that left
    # the open queue (the master keeps a client's later connections behind
    # them) are counted, and sent once per turn of the event loop: under
    # connection churn, one message per connection was a measurable share of
    # both processes' CPU. A turn is short, so the master learns promptly.
    # What metrics count (worker.tally: opens, ends, bytes, failed opens,
    # keepalive round trip, pump buffer) rides in the same message.
    done: dict[str, int] = {}   # per forward
    taken: dict[str, int] = {}  # -R connections the server forwarded, per forward
    resolved = 0
    flush_pending = False

    def schedule_flush():
        nonlocal flush_pending
        if not flush_pending:
            flush_pending = True
            loop.call_soon(flush_counts)

    def flush_counts():
        nonlocal flush_pending, resolved
        flush_pending = False
        if done or resolved or taken or worker.tally.news:
            # accepted before done: a connection that came and went in one turn
            send("counts", accepted=dict(taken), done=dict(done), resolved=resolved, **worker.tally.take())
            taken.clear()
            done.clear()
            resolved = 0

    def on_finished(route_id):
        done[route_id] = done.get(route_id, 0) + 1
        schedule_flush()

    def on_accepted(route_id):
        taken[route_id] = taken.get(route_id, 0) + 1
        schedule_flush()

    def on_resolved(n):
        nonlocal resolved
        resolved += n
        schedule_flush()

    report = OpenReport(send)
    worker = make_worker(opts, f"{prefix}worker {index}", index, on_state=on_state, on_finished=on_finished,
                         on_opened=report.opened, on_resolved=on_resolved)
    worker.tally.on_news = schedule_flush
    worker.remotes.on_accepted = on_accepted
    worker.remotes.on_remote = lambda rid, state, port, reason: send("remote", id=rid, state=state, port=port,
                                                                     reason=reason)

    def on_remote(msg, _fd):
        if msg["add"]:
            worker.remotes.assign(Route.from_wire(msg["route"]), msg["bind"], msg["port"])
        else:
            worker.remotes.withdraw(msg["id"])
    draining = None

    def on_client(msg, fd):
        route = Route.from_wire(msg["route"])
        peer = tuple(msg["peer"]) if isinstance(msg["peer"], list) else msg["peer"]
        if fd is None:  # fd table full: the kernel dropped it
            log.warning("worker %d: client %s lost in transfer (out of file descriptors)", index, peer)
            on_resolved(1)
            on_finished(route.id)
            return
        # Also while draining: after the master's DRAIN none come; after
        # our own signal only those the master sent before it heard of
        # the drain, and they are ours to carry (the drain waits for them).
        worker.submit(socket.socket(fileno=fd), route, peer, msg["conn"], accepted=msg.get("at"))

    def on_query(msg, _fd):
        # Thousands of connections do not fit one datagram: sent in parts,
        # the last one with the pump's totals. Blocking (bounded) while it
        # is sent: a status answer must not lose a part to a full buffer.
        conns = worker.connections(index)
        parts = [conns[i:i + REPORT_PART] for i in range(0, len(conns), REPORT_PART)] or [[]]
        ctrl.settimeout(2.0)
        try:
            for n, part in enumerate(parts):
                last = n == len(parts) - 1
                wire.send(ctrl, "report", id=msg["id"], conns=part, last=last,
                          **({"pump": worker.pump_stats(), "up": worker.up} if last else {}))
        except OSError:
            pass
        finally:
            ctrl.setblocking(False)

    handlers = {
        "client": on_client,
        "drain": lambda msg, _fd: drain(msg["grace"]),
        "retire": lambda msg, _fd: worker.retire(msg["route"], msg["grace"]),
        "query": on_query,
        "remote": on_remote,
    }

    def on_ctrl():
        while True:
            try:
                msg, fd = wire.recv(ctrl)
            except BlockingIOError:
                return
            except OSError:
                msg, fd = None, None
            if msg is None:  # master is gone: nothing to report to, stop now
                loop.remove_reader(ctrl.fileno())
                stopped_event.set()
                return
            handler = handlers.get(msg.get("t"))
            if handler is None:
                log.error("worker %d: unknown message %r from the master", index, msg.get("t"))
                if fd is not None:
                    os.close(fd)
                continue
            handler(msg, fd)

    def drain(grace):
        nonlocal draining
        if draining is None:
            draining = loop.create_task(_drain(grace))

    async def _drain(grace):
        await worker.drain(grace)
        stopped_event.set()

    def on_stop_signal(sig):
        # Ctrl-C, `kill -TERM -PGID` and systemd (KillMode=control-group)
        # signal the whole process group: a worker that gets SIGTERM/SIGINT
        # drains exactly as when the master asks, and tells the master to
        # send it no more clients (the master may not have been signalled).
        if draining is None:
            log.info("worker %d: %s: draining (up to %gs)", index, sig.name, opts.drain_timeout)
            send("draining", reason=sig.name)
        drain(opts.drain_timeout)

    def tick():
        nonlocal ticker
        ticker = loop.call_later(REPORT_INTERVAL, tick)
        report.tick(worker.oldest_open_wait())
        worker.tally.buffered(worker.pump_stats()["buffered"])   # reported only when it changed

    ctrl.setblocking(False)
    loop.add_reader(ctrl.fileno(), on_ctrl)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal, sig)
    # A hang-up (closed terminal, `kill -HUP -PGID`) must not kill a worker;
    # what it means is the master's to decide.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # blocked since birth (procsetup)
    ticker = loop.call_later(REPORT_INTERVAL, tick)
    # Stagger logins: sshd's MaxStartups drops bursts of unauthenticated
    # connections.
    await asyncio.sleep(0.05 * index)
    starting = loop.create_task(worker.start())
    stopped = loop.create_task(stopped_event.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        # Told to stop while still logging in: nothing to drain, and the login
        # runs in a thread that cannot be interrupted; do not wait for it.
        os._exit(0)
    try:
        starting.result()
    except (AuthError, HostKeyError, BridgeError, MuxUnavailableError) as e:
        # Reported, not logged: the master decides (halt with one line, or
        # keep this tunnel's other workers and retry later).
        send("fatal", **error_to_wire(e))
        return EXIT_BOOT_ERROR
    except SshpumpError as e:
        send("down", reason=str(e), **error_to_wire(e))
        worker.start_reconnecting()
    await stopped
    ticker.cancel()
    worker.close()
    flush_counts()  # what close() ended, before the master sees us go
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    raise_fd_limit()
    ctrl = socket.socket(fileno=int(argv[0]))
    if os.getppid() == 1:
        return 1  # the master died before we could arm PDEATHSIG
    config = wire.recv_config(ctrl)
    opts, index = config["opts"], config["index"]
    setup_logging(opts.verbose, prefix=f"sshpump[{os.getpid()}]", log_format=config.get("log_format", "text"),
                  context={"tunnel": config["tunnel"], "worker": index})
    import uvloop

    return uvloop.run(_serve(ctrl, opts, index, config.get("name", "")))


if __name__ == "__main__":
    sys.exit(main())
