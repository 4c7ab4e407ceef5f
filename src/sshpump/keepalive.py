"""ServerAliveInterval / ServerAliveCountMax, as ssh means them: after
``interval`` seconds without a byte from the server, send a keepalive that
expects a reply; after ``count_max`` unanswered in a row, the session is
dead. Any byte from the server counts as an answer (the pump counts them),
so a busy session never sends one."""

from __future__ import annotations

SEND = "send"


class KeepaliveClock:
    def __init__(self, interval: float, count_max: int):
        self.interval = interval
        self.count_max = count_max
        self.seen = (None, 0.0)   # (rx mark, when it last changed)
        self.unanswered = 0

    def reset(self, mark, now: float):
        """A new session: nothing is owed yet."""
        self.seen = (mark, now)
        self.unanswered = 0

    def step(self, mark, now: float) -> str | None:
        """None: nothing to do; SEND: send a keepalive now (then call sent());
        any other string: the session is dead, and why."""
        if mark != self.seen[0]:
            self.reset(mark, now)
            return None
        if now - self.seen[1] < self.interval * (self.unanswered + 1):
            return None
        if self.unanswered >= self.count_max:
            return (f"server not responding ({self.unanswered} keepalives unanswered in "
                    f"{self.interval * self.unanswered:.0f}s)")
        return SEND

    def sent(self):
        self.unanswered += 1
