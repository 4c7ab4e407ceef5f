"""Connect, verify the host key and authenticate: one libssh2 session.

Everything here is blocking (bounded by ConnectTimeout) and runs before the
session is handed to a pump, which then uses it non-blocking.
"""

from __future__ import annotations

import base64
import logging
import os
import socket

import ssh2.exceptions as sx
from ssh2 import knownhost as kh
from ssh2.session import (
    LIBSSH2_HOSTKEY_TYPE_DSS,
    LIBSSH2_HOSTKEY_TYPE_ECDSA_256,
    LIBSSH2_HOSTKEY_TYPE_ECDSA_384,
    LIBSSH2_HOSTKEY_TYPE_ECDSA_521,
    LIBSSH2_HOSTKEY_TYPE_ED25519,
    LIBSSH2_HOSTKEY_TYPE_RSA,
    LIBSSH2_HOSTKEY_HASH_SHA256,
    LIBSSH2_METHOD_CRYPT_CS,
    LIBSSH2_METHOD_CRYPT_SC,
    Session,
)

from . import tcpconn
from .errors import AuthError, ConnectError, ConnectTimeoutError, HostKeyError
from .options import Options

log = logging.getLogger("sshpump")

# libssh2 host key type -> (known_hosts key name, knownhost type bits)
_KEY_TYPES = {
    LIBSSH2_HOSTKEY_TYPE_RSA: ("ssh-rsa", kh.LIBSSH2_KNOWNHOST_KEY_SSHRSA),
    LIBSSH2_HOSTKEY_TYPE_DSS: ("ssh-dss", kh.LIBSSH2_KNOWNHOST_KEY_SSHDSS),
    LIBSSH2_HOSTKEY_TYPE_ECDSA_256: ("ecdsa-sha2-nistp256", kh.LIBSSH2_KNOWNHOST_KEY_ECDSA_256),
    LIBSSH2_HOSTKEY_TYPE_ECDSA_384: ("ecdsa-sha2-nistp384", kh.LIBSSH2_KNOWNHOST_KEY_ECDSA_384),
    LIBSSH2_HOSTKEY_TYPE_ECDSA_521: ("ecdsa-sha2-nistp521", kh.LIBSSH2_KNOWNHOST_KEY_ECDSA_521),
    LIBSSH2_HOSTKEY_TYPE_ED25519: ("ssh-ed25519", kh.LIBSSH2_KNOWNHOST_KEY_ED25519),
}


def host_label(host: str, port: int) -> str:
    """How known_hosts names a host: plain for port 22, [host]:port otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def _fingerprint(session) -> str:
    digest = session.hostkey_hash(LIBSSH2_HOSTKEY_HASH_SHA256)
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def verify_host_key(session, opts: Options) -> None:
    key, ktype = session.hostkey()
    name, bits = _KEY_TYPES.get(ktype, (None, None))
    label = host_label(opts.host, opts.port)
    if opts.strict_host_key_checking == "no":
        log.warning(
            "host key verification is DISABLED (StrictHostKeyChecking=no): %s key %s %s is not checked",
            label, name, _fingerprint(session),
        )
        return
    if name is None:
        raise HostKeyError(f"host key for {label} has an unsupported type ({ktype})")
    store = session.knownhost_init()
    for path in opts.known_hosts:
        if os.path.exists(path):
            try:
                store.readfile(path)
            except sx.KnownHostReadFileError as e:
                raise HostKeyError(f"cannot read known_hosts file {path}: {e}") from None
    typemask = kh.LIBSSH2_KNOWNHOST_TYPE_PLAIN | kh.LIBSSH2_KNOWNHOST_KEYENC_RAW | bits
    try:
        store.checkp(opts.host.encode(), opts.port, key, typemask)
        return
    except sx.KnownHostCheckMisMatchError:
        raise HostKeyError(
            f"host key for {label} does NOT match known_hosts ({name} {_fingerprint(session)}): "
            "possible man-in-the-middle attack; refusing to connect"
        ) from None
    except sx.KnownHostCheckNotFoundError:
        pass
    except sx.KnownHostCheckError as e:
        raise HostKeyError(f"host key check for {label} failed: {e}") from None
    if opts.strict_host_key_checking != "accept-new":
        raise HostKeyError(
            f"host key for {label} is unknown ({name} {_fingerprint(session)}) and "
            "StrictHostKeyChecking=yes; add it to known_hosts or use -o StrictHostKeyChecking=accept-new"
        )
    path = opts.known_hosts[0]
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{label} {name} {base64.b64encode(key).decode()}\n")
    log.warning("permanently added %s (%s) to %s", label, name, path)


def _auth_error_text(e) -> str:
    return f"{type(e).__name__}{': ' + str(e) if str(e) else ''}"


def authenticate(session, opts: Options) -> None:
    user = opts.user
    try:
        methods = session.userauth_list(user) or ""
    except sx.SSH2Error as e:
        raise ConnectError(f"{opts.host}: reading auth methods failed: {_auth_error_text(e)}") from None
    if session.userauth_authenticated():
        return
    if isinstance(methods, str):
        methods = methods.split(",")
    allowed = {m.decode() if isinstance(m, bytes) else m for m in methods}
    methods = ",".join(sorted(allowed))
    tried = []
    if "publickey" in allowed and opts.use_agent and os.environ.get("SSH_AUTH_SOCK"):
        tried.append("agent")
        try:
            session.agent_auth(user)
            return
        except sx.SSH2Error as e:
            log.debug("agent auth failed: %s", _auth_error_text(e))
    if "publickey" in allowed:
        for path in opts.identity_files():
            tried.append(path)
            if not os.path.exists(path):
                log.debug("identity file %s not accessible: No such file", path)  # warned once by the tunnel
                continue
            for passphrase in ("", opts.passphrase) if opts.passphrase else ("",):
                try:
                    session.userauth_publickey_fromfile(user, path, passphrase=passphrase)
                    return
                except sx.SSH2Error as e:
                    log.debug("key %s failed: %s", path, _auth_error_text(e))
    if "password" in allowed and opts.password is not None:
        tried.append("password")
        try:
            session.userauth_password(user, opts.password)
            return
        except sx.SSH2Error as e:
            log.debug("password auth failed: %s", _auth_error_text(e))
    raise AuthError(
        f"authentication failed for {user}@{opts.host} (server allows: {methods or 'none'}; "
        f"tried: {', '.join(tried) or 'nothing usable'})",
        methods=sorted(allowed),
    )


def _open_control_channel(session, opts: Options):
    """A session channel with no command, only so that the pump can read the
    socket while no connection is open: libssh2 processes incoming packets
    only through a channel, and a server with ClientAliveInterval drops a
    client that leaves its keepalives unanswered. None if the server refuses."""
    try:
        return session.open_session()
    except sx.SSH2Error as e:
        log.info("%s: no control channel (%s); an idle session may be dropped by the server",
                 opts.host, type(e).__name__)
        return None


def _tcp_connect(opts: Options) -> socket.socket:
    timeout = opts.connect_timeout
    try:
        sock = tcpconn.connect(opts.host, opts.port, timeout)
    except socket.gaierror as e:
        raise ConnectError(f"cannot resolve {opts.host}: {e.strerror}") from None
    except TimeoutError:
        raise ConnectTimeoutError(f"connection to {opts.host} port {opts.port} timed out") from None
    except OSError as e:
        raise ConnectError(f"connect to {opts.host} port {opts.port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        raise
    return sock


def connect(opts: Options, stream: socket.socket | None = None, control: bool = True):
    """Return (session, sock, control channel or None): authenticated,
    non-blocking, host key verified. ``stream``: a connected socket to run
    the session over instead of a TCP connection to opts.host (one end of a
    socketpair to a ProxyCommand or a jump host's channel); it is ours from
    here on, closed on failure. ``control``: open the idle control channel
    (a jump host's session carries a channel all its life: it needs none)."""
    timeout = opts.connect_timeout
    sock = stream if stream is not None else _tcp_connect(opts)
    try:
        sock.setblocking(True)
        session = Session()
        session.set_timeout(int(timeout * 1000) if timeout else 0)
        session.method_pref(LIBSSH2_METHOD_CRYPT_CS, opts.ciphers)
        session.method_pref(LIBSSH2_METHOD_CRYPT_SC, opts.ciphers)
        try:
            session.handshake(sock)
        except sx.SSH2Error as e:
            raise ConnectError(
                f"SSH handshake with {opts.host} port {opts.port} failed: {_auth_error_text(e)}"
            ) from None
        verify_host_key(session, opts)
        try:
            authenticate(session, opts)
        except sx.SSH2Error as e:
            raise ConnectError(f"{opts.host}: session failed during auth: {_auth_error_text(e)}") from None
        channel = _open_control_channel(session, opts) if control else None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # TCP only: a socketpair has no retransmissions to cap; the
            # hop's own TCP connection has its cap.
            cap = tcpconn.cap_retransmit(sock)
            log.debug("%s: TCP retransmissions %s", opts.host,
                      f"at most {cap} ms apart" if cap else "uncapped (kernel before 6.15)")
        session.set_timeout(0)
        session.keepalive_config(True, 1)  # we decide when; libssh2 only rate-limits
        session.set_blocking(False)
        sock.setblocking(False)
        return session, sock, channel
    except BaseException:
        sock.close()
        raise
