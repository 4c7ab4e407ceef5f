"""The TCP connection under an SSH session: how it is made, and how fast it
recovers from a network partition.

Two kernel timers can hold a session hostage long after a partition has
healed, because both back off exponentially while packets are lost:

- connect: the kernel resends a lost SYN after 1, 2, 4, 8, 16 s... A
  reconnect that began during the partition would wait for the next one.
  ``connect()`` abandons a connect attempt that has not completed in
  SYN_RETRY seconds and starts a fresh one, within the overall bound.
- retransmission: a segment sent into the partition (a keepalive, a channel
  open, client data) is resent after 0.2, 0.4, ... 25.6, 51.2 s, up to
  120 s apart. After a 30 s partition the next resend can be 25 s away, and
  everything queued behind it -- every new client's channel open -- waits
  that long. ``cap_retransmit()`` caps the interval (Linux >= 6.15,
  TCP_RTO_MAX_MS), so the session resumes within about a second of the path
  coming back.
"""

from __future__ import annotations

import socket
import struct
import time

SYN_RETRY = 3.0        # the kernel sends SYNs at 0 and 1 s; a third would come at 3 s
KERNEL_SYN_GIVEUP = 127.0  # what tcp_syn_retries=6 allows, for "no bound" (ConnectTimeout=0)
TCP_RTO_MAX_MS = getattr(socket, "TCP_RTO_MAX_MS", 44)   # linux/tcp.h, Linux 6.15
RTO_CAP_MIN_MS, RTO_CAP_MAX_MS = 1000, 120_000           # what the kernel accepts
RTO_CAP_FACTOR = 4     # cap = 4x the RTO measured at login (at least 1 s)


def connect(host: str, port: int, timeout: float | None) -> socket.socket:
    """A connected TCP socket (blocking, no timeout set). Raises
    socket.gaierror, TimeoutError (nothing answered within ``timeout``) or
    the OSError of the last address tried (refused, unreachable)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    deadline = time.monotonic() + (timeout or KERNEL_SYN_GIVEUP)
    while True:
        timed_out = False
        last = None
        for family, kind, proto, _, addr in infos:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"connect to {host} port {port} timed out")
            sock = socket.socket(family, kind, proto)
            sock.settimeout(min(SYN_RETRY, left))
            try:
                sock.connect(addr)
            except TimeoutError:
                # Its SYNs (or their answers) were lost: a fresh connect
                # sends a SYN now rather than after the kernel's backoff.
                sock.close()
                timed_out = True
                continue
            except OSError as e:
                sock.close()
                last = e
                continue
            sock.settimeout(None)
            return sock
        if not timed_out:
            raise last


def _kernel_giveup_ms() -> int:
    """How long the kernel keeps retransmitting before it drops a
    connection (tcp_retries2, modelled as the kernel does with the default
    200 ms minimum and 120 s maximum RTO): 924.6 s for the default 15."""
    try:
        with open("/proc/sys/net/ipv4/tcp_retries2") as f:
            retries = int(f.read())
    except (OSError, ValueError):
        retries = 15
    doublings = 9  # 200 ms doubled 9 times reaches the 120 s maximum
    if retries <= doublings:
        return ((2 << retries) - 1) * 200
    return ((2 << doublings) - 1) * 200 + (retries - doublings) * 120_000


def cap_retransmit(sock: socket.socket) -> int | None:
    """Cap the retransmission interval of an established connection at
    RTO_CAP_FACTOR times its current RTO (at least 1 s). Returns the cap in
    ms, or None where the kernel has no TCP_RTO_MAX_MS (before 6.15).

    A short cap would also shorten the time after which the kernel gives a
    connection up (it derives it from tcp_retries2 and the maximum RTO), so
    TCP_USER_TIMEOUT restores the usual one: the session still ends when the
    keepalives say so, as before, not sooner."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    rto_ms = struct.unpack_from("I", info, 8)[0] // 1000  # tcpi_rto, microseconds
    cap = max(RTO_CAP_MIN_MS, min(RTO_CAP_MAX_MS, RTO_CAP_FACTOR * rto_ms))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, cap)
    except OSError:
        return None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _kernel_giveup_ms())
    return cap
