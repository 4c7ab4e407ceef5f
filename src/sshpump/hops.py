"""The hops between this machine and the SSH server, and how the stream to
the server is made: a TCP connection (no hop), a ProxyCommand's stdin and
stdout (proxycommand.py), or a chain of jump hosts (jumpchain.py).

A jump host is written as ``ssh -J`` writes it: ``[user@]host[:port]``,
``[user@][v6addr]:port`` or ``ssh://[user@]host[:port]``. Each hop is
reached with the destination's settings (identities, known_hosts,
StrictHostKeyChecking, ConnectTimeout, keepalives, ciphers); its user and
port are its spec's, else the local user and 22, as ssh does for a hop with
no Host block of its own in the config.
"""

from __future__ import annotations

import asyncio

from . import session as ssh_session
from .errors import ConnectError, SshpumpError
from .hopspec import check_transport, proxy_of
from .jumpchain import JumpChain
from .options import Options
from .proxycommand import ProxyCommand


async def open_stream(opts: Options, name: str, on_lost):
    """The stream the session to ``opts.host`` runs over, when it is not a
    plain TCP connection (then None): an object with ``sock`` (one end of a
    socketpair, handed to session.connect, which owns it from then on),
    ``via`` (a few words for the log), ``keepalive(now)`` and ``close()``.
    ``on_lost(reason)`` is called when the stream dies under a session."""
    check_transport(opts)
    command = proxy_of(opts)
    if command is not None:
        return ProxyCommand.start(command, opts, name, on_lost)
    if opts.proxy_jump:
        return await JumpChain.build(opts, name, on_lost)
    return None


async def connect(opts: Options, name: str, on_lost):
    """session.connect, over the stream the options ask for. Returns
    (session, sock, control channel or None, stream or None); the stream
    must be closed after the session (Worker does). When the login fails
    because the stream died (a ProxyCommand that exited, a jump host lost
    on the way), that is the error reported, as ConnectError."""
    stream = await open_stream(opts, name, on_lost)
    if stream is None:
        return (*await asyncio.to_thread(ssh_session.connect, opts), None)
    try:
        session, sock, control = await asyncio.to_thread(ssh_session.connect, opts, stream.sock)
    except SshpumpError:
        why = await stream.why_dead()
        stream.close()
        if why:
            raise ConnectError(why) from None
        raise
    except BaseException:
        stream.close()
        raise
    return session, sock, control, stream
