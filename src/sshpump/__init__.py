"""sshpump: SSH port forwarding (ssh -L) built for throughput and concurrency."""

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
    "forward", "parse_local_forward",
]
