"""``sshpump`` (and ``python -m sshpump``): read the command line, run the
tunnels until a signal or a control command stops them, and turn every
failure into one line on stderr with its exit code (see cli.EXIT_CODES).
``sshpump ctl PATH ...`` is the control socket's client."""

from __future__ import annotations

import base64
import getpass
import json
import logging
import os
import sys

from . import envsecrets
from .cli import one_line, parse_command_line
from .envsecrets import PASSPHRASE_ENV, PASSWORD_ENV
from .errors import AuthError, SshpumpError, UsageError
from .logfmt import fields
from .procsetup import raise_fd_limit, setup_logging
from .remoteset import allocated_text
from .runtime import Runtime

log = logging.getLogger("sshpump")


def _key_is_encrypted(path: str) -> bool:
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeError):
        return False
    if "ENCRYPTED" in text:
        return True
    if "BEGIN OPENSSH PRIVATE KEY" in text:
        body = "".join(line for line in text.splitlines() if not line.startswith("-----"))
        try:
            raw = base64.b64decode(body)
        except ValueError:
            return False
        magic = b"openssh-key-v1\0"
        if raw.startswith(magic):
            n = int.from_bytes(raw[len(magic) : len(magic) + 4], "big")
            cipher = raw[len(magic) + 4 : len(magic) + 4 + n]
            return cipher != b"none"
    return False


def _address_text(addr) -> str:
    if isinstance(addr, str):
        return addr
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _announce_remote(fwd, where: str):
    """ssh prints the port the server chose for -R with port 0, whatever
    the verbosity; so do we (and --ready-fd carries it)."""
    if fwd.remote["state"] == "bound" and fwd.remote["asked"] == 0:
        print(one_line(f"{where}{allocated_text(fwd)}"), file=sys.stderr, flush=True)
    log.info("%sremote forward %s: %s", where, fwd.id, fwd.info("")["listen"][0],
             extra=fields("listening", forward=fwd.id))


async def _run(tunnels, ns, file_config=None) -> int:
    rt = Runtime(control_path=ns.control, config_path=ns.config)
    rt.file_config = file_config
    if tunnels:
        first = tunnels[0][1]
        rt.secrets = (first.password, first.passphrase, first.verbose)
    rt.handle_signals()  # before start: a signal during start-up still closes the listeners
    from .sdnotify import Notifier

    notify = Notifier.from_environ().attach(rt)   # systemd; before any worker: none may inherit $NOTIFY_SOCKET
    if not await rt.start(tunnels):
        log.info("stopped before ready", extra=fields("stopped", reason="before ready"))
        return 0
    listening = rt.listening()
    for entry in listening:
        where = f"tunnel {entry['tunnel']}: " if ns.config else ""
        log.info("%slistening on %s for -L %s (forward %s)", where, _address_text(entry["address"]),
                 entry["spec"], entry["id"],
                 extra=fields("listening", tunnel=entry["tunnel"], forward=entry["id"],
                              address=_address_text(entry["address"])))
    remote = rt.remote_forwards()
    for entry in remote:
        _announce_remote(rt.tunnels[entry["tunnel"]].table.by_id[entry["id"]],
                         f"tunnel {entry['tunnel']}: " if ns.config else "")
    workers = sum(t.opts.workers for t in rt.tunnels.values())
    log.info("ready (pid %d, %d tunnels, %d workers%s)", os.getpid(), len(rt.tunnels), workers,
             f", control socket {ns.control}" if ns.control else "", extra=fields("ready"))
    from .obs.http import serve_metrics

    try:
        metrics = await serve_metrics(rt, ns.metrics)   # --metrics: /metrics and /healthz; None when off
    except SshpumpError:
        rt.request_stop(0)   # its address is taken: close what started (unix socket files), then say why
        await rt.serve()
        raise
    if ns.ready_fd is not None:
        line = json.dumps({"ready": True, "pid": os.getpid(), "control": ns.control, "listen": listening, "remote": remote,
                           **({"metrics": metrics.address} if metrics else {})})
        try:
            os.write(ns.ready_fd, (line + "\n").encode())
            os.close(ns.ready_fd)
        except OSError as e:
            log.warning("cannot write readiness to fd %d: %s", ns.ready_fd, e.strerror)
    notify.ready()   # READY=1 + STATUS= (a no-op without $NOTIFY_SOCKET)
    try:
        await rt.serve()
    finally:
        if metrics is not None:
            await metrics.close()
    log.info("stopped", extra=fields("stopped"))
    return 0


def _from_file(ns, password, passphrase):
    from . import tunnelfile

    cfg = tunnelfile.load(ns.config)
    if ns.check:
        print(tunnelfile.summary(cfg))
        return None, cfg
    if ns.control is None:
        ns.control = cfg.control
    for t in cfg.tunnels.values():
        t.opts.password, t.opts.passphrase = password, passphrase
        t.opts.verbose = ns.verbose
    return [(name, t.opts) for name, t in cfg.tunnels.items()], cfg


def main(argv=None) -> int:
    # Secrets leave the environment first: workers must not inherit them,
    # nor may /proc/PID/environ show them.
    password = envsecrets.take(PASSWORD_ENV)
    passphrase = envsecrets.take(PASSPHRASE_ENV)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ctl"]:
        from .control.client import main as ctl_main

        return ctl_main(argv[1:])
    if argv[:1] == ["status"]:
        from .control.status import main as status_main

        return status_main(argv[1:])
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(argv[1:])
    try:
        opts, ns, batch = parse_command_line(argv)
        file_config = None
        if opts is None:
            tunnels, file_config = _from_file(ns, password, passphrase)
            if tunnels is None:   # --check
                return 0
    except UsageError as e:
        print(one_line(f"sshpump: {e}"), file=sys.stderr)
        return e.exit_code
    setup_logging(ns.verbose, log_format=ns.log_format)
    raise_fd_limit()
    interactive = opts is not None and sys.stdin.isatty() and not batch
    if opts is not None:
        opts.password, opts.passphrase = password, passphrase
        tunnels = [("default", opts)]
        if interactive and opts.passphrase is None:
            for path in opts.identity_files():
                if _key_is_encrypted(path):
                    opts.passphrase = getpass.getpass(f"Enter passphrase for key '{path}': ")
                    break
    import uvloop

    while True:
        try:
            return uvloop.run(_run(tunnels, ns, file_config))
        except AuthError as e:
            if interactive and opts.password is None and "password" in getattr(e, "methods", ()):
                opts.password = getpass.getpass(f"{opts.user}@{opts.host}'s password: ")
                continue
            print(one_line(f"sshpump: {e}"), file=sys.stderr)
            return e.exit_code
        except SshpumpError as e:
            print(one_line(f"sshpump: {e}"), file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
