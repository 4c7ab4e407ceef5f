"""How long a worker waits before each attempt to reconnect its session."""

from __future__ import annotations

import random

MIN = 0.5


class Backoff:
    """Exponential, with jitter, from 0.5 s up to ``cap`` (reconnect_max)
    after failures the server answered (refused, reset, handshake or auth
    failed): a struggling server is not hammered. After an attempt nobody
    answered (the TCP connect timed out: a partition, a dead host) the next
    one comes after the minimum pause: that attempt already waited
    ConnectTimeout, sending SYNs all along, and growing the pause would only
    leave the worker asleep when the path comes back.

    The jitter (0.5x to 1.5x) spreads workers' logins so that sshd's
    MaxStartups does not drop them in a burst."""

    def __init__(self, cap: float, first: bool = False):
        self.cap = cap
        self.delay = 0.0 if first else MIN

    def pause(self) -> float:
        return self.delay * (0.5 + random.random())

    def failed(self, answered: bool = True):
        self.delay = min(max(self.delay * 2, MIN), self.cap) if answered else MIN
