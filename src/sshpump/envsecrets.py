"""Secrets taken from the environment, then scrubbed from it.

Removing a variable from ``os.environ`` (unsetenv) keeps it from children,
but ``/proc/PID/environ`` shows the environment block the kernel copied at
exec time, which unsetenv leaves untouched. So the original bytes of a taken
variable are overwritten in place too: afterwards neither this process's
``/proc/PID/environ`` nor any process it starts carries the secret.
"""

from __future__ import annotations

import ctypes
import os

PASSWORD_ENV = "SSHPUMP_PASSWORD"
PASSPHRASE_ENV = "SSHPUMP_PASSPHRASE"


def take(name: str) -> str | None:
    """Return the variable's value and remove every trace of it from this
    process's environment (None if it was not set)."""
    value = os.environ.pop(name, None)  # unsetenv: no child inherits it
    _wipe_exec_environment(name)
    return value


def _exec_environment_range() -> tuple[int, int] | None:
    """Start and end address of the environment block set up at exec
    (fields 50 and 51 of /proc/self/stat, Linux >= 3.5)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # comm may hold spaces: start after it
    try:
        start, end = int(fields[47]), int(fields[48])
    except (IndexError, ValueError):
        return None
    return (start, end) if 0 < start < end else None


def _wipe_exec_environment(name: str) -> None:
    where = _exec_environment_range()
    if where is None:
        return
    start, end = where
    block = ctypes.string_at(start, end - start)
    prefix = name.encode() + b"="
    offset = 0
    # Only whole entries are zeroed, and only after unsetenv dropped libc's
    # pointers to them: the other entries stay where libc points.
    for entry in block.split(b"\0"):
        if entry.startswith(prefix):
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1


def without_secrets(environ) -> dict:
    """A copy of environ for a child process, minus sshpump's secrets (a
    library user's own process may have them set; workers get them over
    their control socket)."""
    return {k: v for k, v in environ.items() if k not in (PASSWORD_ENV, PASSPHRASE_ENV)}
