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

from . import fdpass
from .errors import AuthError, BridgeError, HostKeyError, SshpumpError
from .procsetup import HANDLED_SIGNALS, raise_fd_limit, setup_logging
from .worker import Worker

EXIT_BOOT_ERROR = 3  # like gunicorn: the master must not respawn in a loop
REPORT_INTERVAL = 0.25  # seconds between open reports to the master (when there is news)

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
        self.send(t="opens", wait=wait, lat=lat)


async def _serve(ctrl: socket.socket, opts, index: int) -> int:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def send(**msg):
        try:
            fdpass.send_status(ctrl, **msg)
        except OSError:  # the master is gone or not reading: it has no use for it
            pass

    def on_state(up, reason):
        fdpass.send_status(ctrl, t="up" if up else "down", reason=reason)

    # Connections finished (the master's load count) and clients that left
    # the open queue (the master keeps a client's later connections behind
    # them) are counted, and sent once per turn of the event loop: under
    # connection churn, one message per connection was a measurable share of
    # both processes' CPU. A turn is short, so the master learns promptly.
    counts = {"done": 0, "resolved": 0}
    flush_pending = False

    def count(key, n):
        nonlocal flush_pending
        counts[key] += n
        if not flush_pending:
            flush_pending = True
            loop.call_soon(flush_counts)

    def flush_counts():
        nonlocal flush_pending
        flush_pending = False
        if counts["done"] or counts["resolved"]:
            send(t="counts", done=counts["done"], resolved=counts["resolved"])
            counts["done"] = counts["resolved"] = 0

    def on_finished(n):
        count("done", n)

    def on_resolved(n):
        count("resolved", n)

    report = OpenReport(send)
    worker = Worker(opts, name=f"worker {index}", on_state=on_state, on_finished=on_finished,
                    on_opened=report.opened, on_resolved=on_resolved)
    draining = None

    def on_ctrl():
        while True:
            try:
                kind, payload, fd = fdpass.recv_master(ctrl)
            except BlockingIOError:
                return
            except OSError:
                kind = None
            if kind is None:  # master is gone: nothing to report to, stop now
                loop.remove_reader(ctrl.fileno())
                done.set()
                return
            if kind == fdpass.CLIENT:
                idx, peer = payload
                if fd is None:  # fd table full: the kernel dropped it
                    log.warning("worker %d: client %s lost in transfer (out of file descriptors)", index, peer)
                    on_resolved(1)
                    on_finished(1)
                    continue
                # Also while draining: after the master's DRAIN none come; after
                # our own signal only those the master sent before it heard of
                # the drain, and they are ours to carry (the drain waits for them).
                worker.submit(socket.socket(fileno=fd), opts.forwards[idx], peer)
            elif kind == fdpass.DRAIN:
                drain(payload)

    def drain(grace):
        nonlocal draining
        if draining is None:
            draining = loop.create_task(_drain(grace))

    async def _drain(grace):
        await worker.drain(grace)
        done.set()

    def on_stop_signal(sig):
        # Ctrl-C, `kill -TERM -PGID` and systemd (KillMode=control-group)
        # signal the whole process group: a worker that gets SIGTERM/SIGINT
        # drains exactly as when the master asks, and tells the master to
        # send it no more clients (the master may not have been signalled).
        if draining is None:
            log.info("worker %d: %s: draining (up to %gs)", index, sig.name, opts.drain_timeout)
            send(t="draining", reason=sig.name)
        drain(opts.drain_timeout)

    def tick():
        nonlocal ticker
        ticker = loop.call_later(REPORT_INTERVAL, tick)
        report.tick(worker.oldest_open_wait())

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
    stopped = loop.create_task(done.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        # Told to stop while still logging in: nothing to drain, and the login
        # runs in a thread that cannot be interrupted; do not wait for it.
        os._exit(0)
    try:
        starting.result()
    except (AuthError, HostKeyError, BridgeError) as e:
        fdpass.send_status(ctrl, t="fatal", code=e.exit_code, msg=str(e))
        return EXIT_BOOT_ERROR
    except SshpumpError as e:
        fdpass.send_status(ctrl, t="down", reason=str(e), code=e.exit_code)
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
    config = fdpass.recv_config(ctrl)
    opts, index = config["opts"], config["index"]
    setup_logging(opts.verbose, prefix=f"sshpump[{os.getpid()}]")
    import uvloop

    return uvloop.run(_serve(ctrl, opts, index))


if __name__ == "__main__":
    sys.exit(main())
