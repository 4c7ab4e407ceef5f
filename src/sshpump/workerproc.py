"""Entry point of a worker process: ``python -m sshpump.workerproc FD``.

The master starts it with one end of a SOCK_SEQPACKET pair as FD, sends the
options (secrets included, never on argv or in the environment), then client
fds. The worker exits when the master goes away (control socket EOF, or
PR_SET_PDEATHSIG if the master is SIGKILLed) or after a drain.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys

from . import fdpass
from .errors import AuthError, BridgeError, HostKeyError, SshpumpError
from .procsetup import raise_fd_limit, setup_logging
from .worker import Worker

EXIT_BOOT_ERROR = 3  # like gunicorn: the master must not respawn in a loop

log = logging.getLogger("sshpump")


def _die_with_parent():
    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


async def _serve(ctrl: socket.socket, opts, index: int) -> int:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    finished_total = 0

    def on_state(up, reason):
        fdpass.send_status(ctrl, t="up" if up else "down", reason=reason)

    def on_finished(n):
        nonlocal finished_total
        finished_total += n
        try:
            fdpass.send_status(ctrl, t="done", n=n)
        except OSError:
            pass

    worker = Worker(opts, name=f"worker {index}", on_state=on_state, on_finished=on_finished)
    draining = None

    def on_ctrl():
        nonlocal draining
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
                    on_finished(1)
                    continue
                sock = socket.socket(fileno=fd)
                if draining is not None:
                    sock.close()
                    on_finished(1)
                else:
                    worker.submit(sock, opts.forwards[idx], peer)
            elif kind == fdpass.DRAIN and draining is None:
                draining = loop.create_task(_drain(payload))

    async def _drain(grace):
        await worker.drain(grace)
        done.set()

    ctrl.setblocking(False)
    loop.add_reader(ctrl.fileno(), on_ctrl)
    loop.add_signal_handler(signal.SIGTERM, lambda: done.set())
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the master decides
    # Stagger logins: sshd's MaxStartups drops bursts of unauthenticated
    # connections.
    await asyncio.sleep(0.05 * index)
    try:
        await worker.start()
    except (AuthError, HostKeyError, BridgeError) as e:
        fdpass.send_status(ctrl, t="fatal", code=e.exit_code, msg=str(e))
        return EXIT_BOOT_ERROR
    except SshpumpError as e:
        fdpass.send_status(ctrl, t="down", reason=str(e), code=e.exit_code)
        worker.start_reconnecting()
    await done.wait()
    worker.close()
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
