"""sshpump: SSH port forwarding (ssh -L) built for throughput and concurrency."""

# First: load the patched libssh2 before anything binds ssh2-python's own.
from .libssh2_loader import LOADED as LIBSSH2  # noqa: I001
from .api import Tunnel, forward
from .errors import (
    AuthError,
    BridgeError,
    ChannelOpenError,
    ConnectError,
    ForwardError,
    HostKeyError,
    SpecError,
    SshpumpError,
    UsageError,
)
from .options import Options
from .spec import Endpoint, LocalForward, parse_local_forward

__all__ = [
    "AuthError", "BridgeError", "ChannelOpenError", "ConnectError", "Endpoint", "ForwardError",
    "HostKeyError", "LocalForward", "Options", "SpecError", "SshpumpError", "Tunnel", "UsageError",
    "LIBSSH2", "forward", "parse_local_forward",
]
