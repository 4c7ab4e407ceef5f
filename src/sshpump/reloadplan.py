"""What a reload changes: the tunnels of the old file against the new one's.

A tunnel is known by its name. Per name:

- only in the new file: ``added``; only in the old one: ``removed``;
- its Options differ in anything but the forwards (destination, user, port,
  keys, known_hosts, timeouts, workers, ...): ``restarted``, and only there
  (its forwards come with its new Options; it is in neither forwards dict);
- same Options: the forwards are compared by what they do, (listen, target),
  not by their spec text (``00080:h:22`` is ``80:h:22``): the difference goes
  to ``forwards_added`` / ``forwards_removed`` (names with changes only);
- nothing changed: ``unchanged``.

Not compared: ``password``, ``passphrase`` (never from a file: the runtime
gives every tunnel the ones it read from its environment) and ``verbose``
(the command line's -v). The runtime may set them on either side without
making every reload restart every tunnel.

Forwards are compared as multisets: two identical port-0 forwards (each its
own ephemeral port) on one side and one on the other make one removal; which
listener goes is the runtime's choice. (tunnelfile.load refuses identical
forwards in one tunnel, so a file never gives this.)

Order: ``added``, ``restarted``, ``unchanged``, the keys of both forwards
dicts and the lists in ``forwards_added`` follow the new file; ``removed``
and the lists in ``forwards_removed`` the old one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

from .options import Options
from .spec import LocalForward
from .tunnelfile import TunnelConfig

NOT_COMPARED = ("forwards", "password", "passphrase", "verbose")
COMPARED = tuple(f.name for f in fields(Options) if f.name not in NOT_COMPARED)


@dataclass
class Plan:
    added: list[TunnelConfig] = field(default_factory=list)       # new tunnel names
    removed: list[str] = field(default_factory=list)              # names gone from the file
    restarted: list[TunnelConfig] = field(default_factory=list)   # same name, options changed
    forwards_added: dict[str, list[LocalForward]] = field(default_factory=dict)
    forwards_removed: dict[str, list[LocalForward]] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        """Nothing to do: every tunnel is unchanged."""
        return not (self.added or self.removed or self.restarted
                    or self.forwards_added or self.forwards_removed)


def session_key(opts: Options) -> tuple:
    """Everything in Options that a change of needs a restart."""
    return tuple(_hashable(getattr(opts, name)) for name in COMPARED)


def forward_key(fwd: LocalForward) -> tuple:
    """A forward by what it does (its kind: -L, -R, -D; where it listens;
    its target): the spec text is left out."""
    return (type(fwd).__name__, fwd.listen, fwd.target)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def _minus(these: list[LocalForward], those: list[LocalForward]) -> list[LocalForward]:
    """``these`` without ``those`` (by forward_key, as multisets), in order."""
    left = Counter(forward_key(f) for f in those)
    out = []
    for f in these:
        k = forward_key(f)
        if left[k]:
            left[k] -= 1
        else:
            out.append(f)
    return out


def plan(old: dict[str, TunnelConfig], new: dict[str, TunnelConfig]) -> Plan:
    """What turns the running tunnels ``old`` into ``new`` (name -> TunnelConfig)."""
    p = Plan()
    p.removed = [name for name in old if name not in new]
    for name, t in new.items():
        before = old.get(name)
        if before is None:
            p.added.append(t)
        elif session_key(before.opts) != session_key(t.opts):
            p.restarted.append(t)
        else:
            gone = _minus(before.opts.forwards, t.opts.forwards)
            came = _minus(t.opts.forwards, before.opts.forwards)
            if gone:
                p.forwards_removed[name] = gone
            if came:
                p.forwards_added[name] = came
            if not (gone or came):
                p.unchanged.append(name)
    return p
