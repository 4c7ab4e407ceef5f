"""Jump host specs and the checks of how the stream to the server is made:
``[user@]host[:port]`` as ``ssh -J`` writes it, a hop's Options, and the
ProxyJump / ProxyCommand checks. Offline and cheap: the option checks use it
before anything connects; hops.py and jumpchain.py build on it."""

from __future__ import annotations

import dataclasses

from . import validate
from .errors import UsageError
from .options import Options
from .proxycommand import expand_tokens


@dataclasses.dataclass(frozen=True)
class HopSpec:
    host: str
    port: int | None = None
    user: str | None = None


def parse_hop(text: str) -> HopSpec:
    """One ``-J`` element as a HopSpec; raises UsageError."""
    what = f"jump host {validate.show(text)}"
    if not isinstance(text, str) or not text.strip():
        raise UsageError("empty jump host")
    rest = text.strip()
    if rest.startswith("ssh://"):
        rest = rest[len("ssh://"):].rstrip("/")
    user, at, hostport = rest.rpartition("@")
    if at and not user:
        raise UsageError(f"{what}: empty user name")
    port = None
    if hostport.startswith("["):
        host, bracket, after = hostport[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise UsageError(f"{what}: expected [address]:port")
        port_text = after[1:] if after else None
    elif hostport.count(":") == 1:
        host, _, port_text = hostport.partition(":")
    else:
        host, port_text = hostport, None   # a name, or a bare IPv6 address
    if port_text is not None:
        port = validate.port(port_text, what)
    validate.host(host, what, resolved_here=True)
    return HopSpec(host=host, port=port, user=validate.user(user, what) if user else None)


def _local_user() -> str:
    """Who ssh logs in as when nobody is named: Options' own default."""
    return next(f for f in dataclasses.fields(Options) if f.name == "user").default_factory()


def hop_options(base: Options, hop: str) -> Options:
    """The Options of one jump host: a copy of the destination's, its host,
    port and user replaced by the hop's (as ssh: port 22 and the local user
    when the spec has none, not the destination's), with no forwards and no
    proxy of its own (the chain decides how it is reached)."""
    spec = parse_hop(hop)
    # Where the hop's own settings could be resolved (``ssh -G hop``: its
    # keys, known_hosts): one call here, on the returned Options. The CLI
    # already writes each hop's HostName, User and Port out (sshconfig).
    return dataclasses.replace(
        base, host=spec.host, port=spec.port or 22, user=spec.user or _local_user(),
        forwards=[], proxy_jump=[], proxy_command=None,
        identities=list(base.identities), known_hosts=list(base.known_hosts),
    )


def hop_name(opts: Options) -> str:
    """How an error names a jump host: as ssh names a host it connects to."""
    return f"jump host {opts.host} port {opts.port}"


def proxy_of(opts: Options) -> str | None:
    """The ProxyCommand that makes the stream, if any ("none" is none, as in ssh)."""
    cmd = opts.proxy_command
    if cmd is None or cmd.strip().lower() == "none" or not cmd.strip():
        return None
    return cmd


def check_transport(opts: Options) -> None:
    """The hop specs and the ProxyCommand's tokens are valid; raises
    UsageError. ssh takes one of ProxyJump and ProxyCommand (whichever the
    config names first): both reaching here is a mistake of whoever filled
    them. Cheap and offline: meant for the option check before start too."""
    if opts.proxy_jump and proxy_of(opts) is not None:
        raise UsageError("ProxyJump and ProxyCommand cannot both be set")
    if not isinstance(opts.proxy_jump, (list, tuple)):
        raise UsageError(f"proxy_jump must be a list of [user@]host[:port], not {opts.proxy_jump!r}")
    for hop in opts.proxy_jump:
        parse_hop(hop)
    command = proxy_of(opts)
    if command is not None:
        expand_tokens(command, opts)
