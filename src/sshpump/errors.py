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
    """No authentication method succeeded."""

    exit_code = 5


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
