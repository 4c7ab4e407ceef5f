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


class BridgeError(SshpumpError, RuntimeError):
    """The installed ssh2-python does not match what the C pump expects."""

    exit_code = 7


class WorkerError(SshpumpError):
    """A worker process failed in a way that has no more specific type."""

    exit_code = 7


def error_to_wire(e: SshpumpError) -> dict:
    """What crosses a process boundary (worker -> master, control socket):
    the class name, the exit code and the one-line message."""
    extra = {k: v for k, v in vars(e).items() if isinstance(v, (str, int, list)) and k != "exit_code"}
    return {"type": type(e).__name__, "code": e.exit_code, "msg": str(e), "attrs": extra}


def error_from_wire(msg: dict) -> SshpumpError:
    """Rebuild the error a worker or a control peer reported, with its type:
    a known subclass by name, else a plain SshpumpError with the exit code."""
    cls = _BY_NAME.get(msg.get("type", ""), SshpumpError)
    text = msg.get("msg") or msg.get("error") or "unknown error"
    err = cls.__new__(cls)
    Exception.__init__(err, text)
    for key, value in (msg.get("attrs") or {}).items():
        setattr(err, key, value)
    code = msg.get("code")
    if isinstance(code, int) and code != cls.exit_code:
        err.exit_code = code
    return err


_BY_NAME = {c.__name__: c for c in (
    SshpumpError, UsageError, SpecError, ConnectError, ConnectTimeoutError, HostKeyError,
    AuthError, ForwardError, ChannelOpenError, BridgeError, WorkerError)}
