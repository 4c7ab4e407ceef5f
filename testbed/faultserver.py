"""Fault-injecting SSH endpoint, run in its OWN PROCESS.

``python -m testbed.faultserver --host-key KEY [--authorized-keys FILE]
[--password PW] [--upstream HOST:PORT]`` prints one JSON line
``{"pid": .., "port": <public port>, "backend_port": <ssh server port>}``
then obeys one-word commands on stdin, answering each with a JSON line
(stdin EOF = exit):

* ``drop``   close every client TCP connection abruptly (FIN, no SSH disconnect
             message) -- the server "died"; new connections are still accepted.
* ``reset``  same but with TCP RST (SO_LINGER 0).
* ``hang``   stop forwarding bytes in both directions on every connection, and
             on new ones (TCP connect succeeds, no banner) -- a hung network.
* ``resume`` undo ``hang``.
* ``down``   close the listening socket (connects get ECONNREFUSED); ``up`` re-opens
             the same port.
* ``stats``  -> ``{"accepted": N, "active": N, "hung": bool, "listening": bool}``.

Architecture: the public port is a small asyncio TCP proxy; behind it is
either an asyncssh server (default) or ``--upstream`` (e.g. the real OpenSSH
``Sshd`` -- then use ``sshd.known_hosts_for(faultserver.port)``).

The asyncssh server accepts any user name with public-key auth against
``--authorized-keys`` (and ``--password`` if given).  ``direct-tcpip``:
destination port 1 -> OPEN_ADMINISTRATIVELY_PROHIBITED, port 2 ->
OPEN_CONNECT_FAILED, port 3 -> an echo inside the server that records in
``stats`` (``ends``) whether each channel closed after the client's EOF or
without one; anything else is really connected to (dest_host, dest_port).  ``direct-streamlocal`` connects to the requested path.

Parent-side handle: ``FaultServer`` (context manager), see its docstring.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading

from . import REPO_ROOT
from ._util import Service, stop_child

ADMIN_PROHIBITED_PORT = 1
CONNECT_FAILED_PORT = 2
RECORD_PORT = 3   # an echo inside the server that records how each channel ended


# --------------------------------------------------------------------------
# child process
# --------------------------------------------------------------------------
class _State:
    def __init__(self):
        self.pairs: set = set()
        self.accepted = 0
        self.hung = False
        self.server = None
        # channels to RECORD_PORT: closed after the client's EOF, or without one
        self.ends = {"eof_then_close": 0, "close_without_eof": 0}
        self.port = 0


ST = _State()


class _Side(asyncio.Protocol):
    def __init__(self, pair, name):
        self.pair = pair
        self.name = name
        self.transport = None
        self.peer_full = False

    def connection_made(self, transport):
        self.transport = transport
        if ST.hung:
            transport.pause_reading()

    def data_received(self, data):
        other = self.pair.other(self)
        if other is None or other.transport is None:
            self.pair.pending[self.name] += data  # backend not connected yet
            return
        other.transport.write(data)

    def eof_received(self):
        other = self.pair.other(self)
        if other is not None and other.transport is not None and other.transport.can_write_eof():
            other.transport.write_eof()
        return True

    def connection_lost(self, exc):
        self.pair.close()

    def pause_writing(self):
        o = self.pair.other(self)
        if o is not None and o.transport is not None:
            o.peer_full = True
            o.transport.pause_reading()

    def resume_writing(self):
        o = self.pair.other(self)
        if o is not None and o.transport is not None:
            o.peer_full = False
            if not ST.hung:
                o.transport.resume_reading()


class _Pair:
    def __init__(self):
        self.client = _Side(self, "client")
        self.backend = None
        self.pending = {"client": bytearray(), "backend": bytearray()}
        self.closed = False

    def other(self, side):
        return self.backend if side is self.client else self.client

    def sides(self):
        return [s for s in (self.client, self.backend) if s is not None and s.transport is not None]

    def close(self, rst=False):
        if self.closed:
            return
        self.closed = True
        ST.pairs.discard(self)
        for s in self.sides():
            if rst:
                sock = s.transport.get_extra_info("socket")
                if sock is not None:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
            s.transport.abort()


async def _connect_backend(pair, host, port):
    loop = asyncio.get_running_loop()
    try:
        pair.backend = _Side(pair, "backend")
        await loop.create_connection(lambda: pair.backend, host, port)
    except OSError:
        pair.close()
        return
    if pair.closed:
        pair.backend.transport.abort()
        return
    if pair.pending["client"]:
        pair.backend.transport.write(bytes(pair.pending["client"]))
        pair.pending["client"].clear()


def _client_factory(backend_host, backend_port):
    def factory():
        pair = _Pair()
        ST.pairs.add(pair)
        ST.accepted += 1
        asyncio.get_running_loop().create_task(_connect_backend(pair, backend_host, backend_port))
        return pair.client
    return factory


async def _listen(factory, port):
    loop = asyncio.get_running_loop()
    ST.server = await loop.create_server(factory, "127.0.0.1", port, reuse_address=True)
    ST.port = ST.server.sockets[0].getsockname()[1]


async def _handle(cmd, factory):
    if cmd in ("drop", "reset"):
        n = len(ST.pairs)
        for p in list(ST.pairs):
            p.close(rst=(cmd == "reset"))
        return {"ok": True, "closed": n}
    if cmd == "hang":
        ST.hung = True
        for p in ST.pairs:
            for s in p.sides():
                s.transport.pause_reading()
        return {"ok": True}
    if cmd == "resume":
        ST.hung = False
        for p in ST.pairs:
            for s in p.sides():
                if not s.peer_full:
                    s.transport.resume_reading()
        return {"ok": True}
    if cmd == "down":
        if ST.server is not None:
            ST.server.close()
            await ST.server.wait_closed()
            ST.server = None
        return {"ok": True}
    if cmd == "up":
        if ST.server is None:
            await _listen(factory, ST.port)
        return {"ok": True}
    if cmd == "stats":
        return {"ok": True, "accepted": ST.accepted, "active": len(ST.pairs),
                "hung": ST.hung, "listening": ST.server is not None, "ends": dict(ST.ends)}
    return {"ok": False, "error": f"unknown command {cmd!r}"}


class _RecordingEcho:
    """A direct-tcpip channel served inside the server (an asyncssh
    SSHTCPSession): echoes, and records whether the client sent EOF before
    the channel closed -- what a forwarder's "cut" looks like to a server."""

    def connection_made(self, chan):
        self.chan = chan
        self.eof = False

    def session_started(self):
        pass

    def data_received(self, data, datatype):
        self.chan.write(data)

    def eof_received(self):
        self.eof = True
        self.chan.write_eof()
        return True  # keep the channel open until the client closes

    def connection_lost(self, exc):
        ST.ends["eof_then_close" if self.eof else "close_without_eof"] += 1

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass


def _make_ssh_server_class(asyncssh, password):
    class Server(asyncssh.SSHServer):
        def begin_auth(self, username):
            return True

        def public_key_auth_supported(self):
            return True

        def password_auth_supported(self):
            return password is not None

        def validate_password(self, username, pw):
            return password is not None and pw == password

        def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
            if dest_port == ADMIN_PROHIBITED_PORT:
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                                "administratively prohibited (testbed port 1)")
            if dest_port == CONNECT_FAILED_PORT:
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                                "connect failed (testbed port 2)")
            if dest_port == RECORD_PORT:
                return _RecordingEcho()
            return True

        def unix_connection_requested(self, dest_path):
            return True

    return Server


async def _amain(args):
    loop = asyncio.get_running_loop()
    if args.upstream:
        host, _, port = args.upstream.rpartition(":")
        backend = (host.strip("[]") or "127.0.0.1", int(port))
    else:
        import asyncssh
        opts = dict(server_host_keys=[args.host_key],
                    server_factory=_make_ssh_server_class(asyncssh, args.password),
                    allow_scp=False, keepalive_interval=0)
        if args.authorized_keys:
            opts["authorized_client_keys"] = args.authorized_keys
        ssh_server = await asyncssh.listen("127.0.0.1", 0, **opts)
        backend = ("127.0.0.1", ssh_server.sockets[0].getsockname()[1])
    factory = _client_factory(*backend)
    await _listen(factory, 0)
    sys.stdout.write(json.dumps({"pid": os.getpid(), "port": ST.port,
                                 "backend_port": backend[1]}) + "\n")
    sys.stdout.flush()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = line.strip()
        if not cmd:
            continue
        try:
            reply = await _handle(cmd, factory)
        except Exception as e:  # report, keep serving
            reply = {"ok": False, "error": repr(e)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m testbed.faultserver")
    ap.add_argument("--host-key", help="private host key file (asyncssh mode)")
    ap.add_argument("--authorized-keys", help="authorized_keys file (asyncssh mode)")
    ap.add_argument("--password", help="also accept this password (asyncssh mode)")
    ap.add_argument("--upstream", help="HOST:PORT to proxy to instead of the asyncssh server")
    args = ap.parse_args(argv)
    if not args.upstream and not args.host_key:
        ap.error("--host-key is required unless --upstream is given")
    try:
        asyncio.run(_amain(args))
    except KeyboardInterrupt:
        pass
    os._exit(0)


# --------------------------------------------------------------------------
# parent-side handle
# --------------------------------------------------------------------------
class FaultServer(Service):
    """Handle for a ``python -m testbed.faultserver`` child process.

    Constructor::

        FaultServer(authorized_keys=None, password=None, upstream=None)

    * ``authorized_keys``: path of an authorized_keys file.  If None (and no
      upstream) a client key pair is generated: ``client_key`` (ed25519,
      unencrypted) and the matching ``authorized_keys`` file.
    * ``password``: also accept password auth with this password (any user).
    * ``upstream``: (host, port) to proxy to -- e.g. ``(sshd.host, sshd.port)``
      to put faults in front of the real OpenSSH server.  Then ``known_hosts``
      is None; build one with ``sshd.known_hosts_for(fault.port)``.

    Attributes: host ("127.0.0.1"), port (public/proxied port -- connect here),
    backend_port, host_key (private key path), host_public_key, known_hosts
    (``[127.0.0.1]:port,[localhost]:port`` -> host key), client_key,
    authorized_keys, user ("sshpump-test"; any name is accepted), password,
    tmpdir, pid, proc.

    Methods (each sends a command and returns the child's JSON reply):
    drop(), reset(), hang(), resume(), down(), up(), stats(); stop().
    """

    host = "127.0.0.1"
    user = "sshpump-test"
    ADMIN_PROHIBITED_PORT = ADMIN_PROHIBITED_PORT
    CONNECT_FAILED_PORT = CONNECT_FAILED_PORT

    def __init__(self, authorized_keys: str | None = None, password: str | None = None,
                 upstream: tuple | None = None):
        import asyncssh
        self.tmpdir = tempfile.mkdtemp(prefix="sshpump-fault-")
        os.chmod(self.tmpdir, 0o755)
        self.password = password
        self.upstream = upstream
        self.client_key = None
        self.known_hosts = None
        self.host_key = None
        self.host_public_key = None
        self.authorized_keys = authorized_keys
        self.proc = None
        self.pid = None
        self.port = None
        self.backend_port = None
        self._lock = threading.Lock()
        if upstream is None:
            self.host_key = os.path.join(self.tmpdir, "host_ed25519")
            k = asyncssh.generate_private_key("ssh-ed25519")
            k.write_private_key(self.host_key)
            os.chmod(self.host_key, 0o600)
            self.host_public_key = k.export_public_key().decode().split()[:2]
            self.host_public_key = " ".join(self.host_public_key)
            if authorized_keys is None:
                self.client_key = os.path.join(self.tmpdir, "client_ed25519")
                ck = asyncssh.generate_private_key("ssh-ed25519", comment="faultserver-client")
                ck.write_private_key(self.client_key)
                ck.write_public_key(self.client_key + ".pub")
                os.chmod(self.client_key, 0o600)
                self.authorized_keys = os.path.join(self.tmpdir, "authorized_keys")
                shutil.copy(self.client_key + ".pub", self.authorized_keys)

    def start(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        argv = [sys.executable, "-m", "testbed.faultserver"]
        if self.upstream:
            argv += ["--upstream", f"{self.upstream[0]}:{self.upstream[1]}"]
        else:
            argv += ["--host-key", self.host_key]
            if self.authorized_keys:
                argv += ["--authorized-keys", self.authorized_keys]
            if self.password is not None:
                argv += ["--password", self.password]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, cwd=REPO_ROOT, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"faultserver exited with {self.proc.returncode} before reporting")
        info = json.loads(line)
        self.pid, self.port, self.backend_port = info["pid"], info["port"], info["backend_port"]
        if self.host_public_key:
            self.known_hosts = os.path.join(self.tmpdir, "known_hosts")
            with open(self.known_hosts, "w") as f:
                f.write(f"[127.0.0.1]:{self.port},[localhost]:{self.port} {self.host_public_key}\n")
        return self

    def command(self, cmd: str) -> dict:
        with self._lock:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("faultserver died")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"faultserver {cmd}: {reply}")
        return reply

    def drop(self):
        return self.command("drop")

    def reset(self):
        return self.command("reset")

    def hang(self):
        return self.command("hang")

    def resume(self):
        return self.command("resume")

    def down(self):
        return self.command("down")

    def up(self):
        return self.command("up")

    def stats(self):
        return self.command("stats")

    def stop(self):
        if self.proc is not None:
            stop_child(self.proc)
            self.proc = None



if __name__ == "__main__":
    main()
