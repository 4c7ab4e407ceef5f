"""Errors with the exit codes the CLI uses. Each names what failed in one line."""


class SshpumpError(Exception):
    """Base of every sshpump error."""

    exit_code = 1


class UsageError(SshpumpError, ValueError):
    """Bad command line or API arguments."""

    exit_code = 2


class SpecError(UsageError):
    """A malformed forward specification (-L)."""


class ConnectError(SshpumpError, ConnectionError):
    """The SSH server could not be reached or the session failed."""

    exit_code = 3


class ConnectTimeoutError(ConnectError):
    """Nothing answered the TCP connect within ConnectTimeout (a partition,
    a host that is down, a firewall that drops): a reconnecting worker
    tries again soon, without growing its backoff (see backoff.py)."""


class HostKeyError(SshpumpError, ConnectionError):
    """The server's host key is unknown or does not match known_hosts: the
    connection is refused, so it is a ConnectionError like ConnectError."""

    exit_code = 4


class AuthError(SshpumpError, PermissionError):
    """No authentication method succeeded. ``methods``: what the server
    allows (the CLI asks for a password only when it is among them)."""

    exit_code = 5

    def __init__(self, message: str, methods=()):
        super().__init__(message)
        self.methods = list(methods)


class ForwardError(SshpumpError, OSError):
    """A forward could not be set up (listen address in use, ...)."""

    exit_code = 6


class ChannelOpenError(SshpumpError, ConnectionError):
    """The server refused to open a channel to the target.

    ``reason`` is what the server said: "administratively prohibited"
    (server policy: AllowTcpForwarding, PermitOpen) or "connect failed"
    (the target refused or is unreachable), among others.
    """

    exit_code = 6

    def __init__(self, target, reason):
        super().__init__(f"channel open to {target} failed: {reason}")
        self.target = target
        self.reason = reason


class MuxUnavailableError(SshpumpError):
    """--mux was asked for and the server cannot run its agent (no shell,
    no python3, an exec refused): the tunnel does not start, and channels
    are never used instead without being asked (the mux bypasses sshd's
    forwarding policy, so neither way is silent)."""

    exit_code = 3


class BridgeError(SshpumpError, RuntimeError):
    """The installed ssh2-python does not match what the C pump expects."""

    exit_code = 7


class WorkerError(SshpumpError):
    """A worker process failed in a way that has no more specific type."""

    exit_code = 7


def error_to_wire(e: SshpumpError) -> dict:
    """What crosses a process boundary (worker -> master, the control
    socket): the class name, the exit code, the one-line message, and the
    error's plain attributes (AuthError.methods, ChannelOpenError.reason)."""
    attrs = {k: v for k, v in vars(e).items()
             if k != "exit_code" and isinstance(v, (str, int, list)) and not isinstance(v, bool)}
    return {"type": type(e).__name__, "code": int(e.exit_code), "msg": str(e), "attrs": attrs}


def _error_classes() -> dict:
    # Every subclass defined so far, by name, first definition winning: a new
    # error class elsewhere needs no registration to cross a boundary.
    found, stack = {}, [SshpumpError]
    while stack:
        cls = stack.pop(0)
        found.setdefault(cls.__name__, cls)
        stack.extend(cls.__subclasses__())
    return found


def error_from_wire(msg: dict) -> SshpumpError:
    """Rebuild a reported error with its type: the subclass named by "type"
    (a plain SshpumpError when unknown), its message ("msg", or "error" as
    the control socket calls it), attributes and exit code."""
    cls = _error_classes().get(msg.get("type"), SshpumpError)
    err = cls.__new__(cls)            # not __init__: subclasses take other arguments
    text = msg.get("msg") or msg.get("error") or "unknown error"
    Exception.__init__(err, "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)))
    attrs = msg.get("attrs")
    if isinstance(attrs, dict):
        for key, value in attrs.items():
            if isinstance(key, str) and key.isidentifier() and not key.startswith("_") and key != "exit_code":
                setattr(err, key, value)
    code = msg.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 0 < code < 256 and code != cls.exit_code:
        err.exit_code = code
    return err
