"""~/.ssh/config read exactly as OpenSSH reads it: ``ssh -G`` resolves it
(Include, Host and Match blocks, "first value wins", the command line
winning over the file) and prints one lowercase ``key value`` line per
setting; this module runs it, reads those lines and fills the Options fields
sshpump uses. Only the command line (cli.py) reads the config: library
callers pass explicit values.

What ``ssh -G`` prints needs care (DESIGN.md section 9):
- it prints a default for every key, so a default is told apart from a
  value the user chose by comparing with ``ssh -G -F none`` (ssh's defaults
  for this ssh version), and sshpump's own defaults are kept for those
  (ConnectTimeout 30 s, ServerAliveInterval 30 s, its cipher order);
- IdentityFile comes out with ``~`` and %-tokens unexpanded (sshtokens.py
  expands them as ssh.c does; %C is asked of ssh itself, as its hash
  differs between ssh versions); unix-socket forward paths come out with
  their %-tokens expanded but a leading ``~`` left as written;
- a LocalForward to a unix path is printed a second time as a phantom
  ``dynamicforward`` line (readconf.c dump_cfg_forwards): dropped here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

from . import sshtokens, validate
from .errors import UsageError
from .hopspec import parse_hop
from .options import Options
from .spec import RemoteForward, parse_dynamic_forward, parse_local_forward
from .sshopts import parse_jump

SSH_MISSING = "ssh not found: ~/.ssh/config is not read; using the command line alone"
SSH_G_TIMEOUT = 60.0   # Match exec runs the user's commands: bounded, not trusted to end
YES = {"yes": True, "true": True, "no": False, "false": False}
STRICT = {"ask": "yes", "true": "yes", "yes": "yes", "false": "no", "no": "no", "off": "no",
          "accept-new": "accept-new"}
# Keys ssh -G prints once per value: every line counts, in order.
MULTI = {"identityfile", "localforward", "remoteforward", "dynamicforward"}


@dataclass
class Query:
    """What the command line hands to ``ssh -G``: only what takes part in
    the resolution (Host/Match matching, %-tokens, ProxyJump versus
    ProxyCommand). Options sshpump reads its own way are not passed."""

    destination: str              # [user@]host as ssh takes it
    config_file: str | None = None
    port: str | None = None
    login: str | None = None
    jump: str | None = None
    options: list[str] = field(default_factory=list)   # "Key=value" for ssh's -o


@dataclass
class Resolved:
    """ssh's answer: {key: [values]} for the host asked and for no config."""

    settings: dict[str, list[str]]
    defaults: dict[str, list[str]]

    def one(self, key: str) -> str | None:
        values = self.settings.get(key)
        return values[0] if values else None

    def chosen(self, key: str) -> str | None:
        """The value, or None where it is ssh's default (not the user's)."""
        value = self.one(key)
        return None if self.settings.get(key) == self.defaults.get(key) else value


def find_ssh() -> str | None:
    return shutil.which("ssh")


def _ssh_g(ssh: str, args: list[str]) -> dict[str, list[str]]:
    try:
        r = subprocess.run([ssh, "-G", *args], stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=SSH_G_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise UsageError(f"ssh -G did not finish within {SSH_G_TIMEOUT:g}s "
                         "(a Match exec command in the ssh config?)") from None
    except OSError as e:
        raise UsageError(f"cannot run {ssh} -G: {e.strerror}") from None
    if r.returncode != 0:
        # Debian's ssh also says "Pseudo-terminal will not be allocated ...": not the problem.
        lines = [ln.strip() for ln in r.stderr.decode(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith("Pseudo-terminal will not be allocated")]
        said = lines[0] if lines else "no message"
        raise UsageError(f"ssh config: ssh -G failed (exit {r.returncode}): {said}")
    settings: dict[str, list[str]] = {}
    for line in r.stdout.decode(errors="surrogateescape").splitlines():
        key, _, value = line.partition(" ")
        key = key.lower()
        if key in MULTI:
            settings.setdefault(key, []).append(value)
        else:
            settings[key] = [value]
    return settings


def resolve(ssh: str, q: Query) -> Resolved:
    """Run ``ssh -G`` for the query, and once with ``-F none`` for ssh's
    defaults. Raises UsageError (one line, ssh's own first line quoted)."""
    args = ["-F", q.config_file] if q.config_file is not None else []
    for flag, value in (("-p", q.port), ("-l", q.login), ("-J", q.jump)):
        if value is not None:
            args += [flag, value]
    for text in q.options:
        args += ["-o", text]
    # ControlPath is expanded by ssh -G itself: %C from the ssh that resolves.
    args += ["-o", "ControlPath=%C", "--", q.destination]
    settings = _ssh_g(ssh, args)
    defaults = _ssh_g(ssh, ["-F", "none", "--", "sshpump.invalid"])
    return Resolved(settings, defaults)


def resolve_hops(ssh: str, hops: list[str], config_file: str | None) -> list[str]:
    """Each jump host as ssh reaches it: ssh connects to a hop as to any
    host, with the hop's own Host/Match blocks (its HostName, User, Port;
    the local user when none names one, not the destination's). Returned
    as "user@host:port" so that the jump chain needs no config of its own."""

    out = []
    for hop in hops:
        spec = parse_hop(hop)
        args = ["-F", config_file] if config_file is not None else []
        if spec.user:
            args += ["-l", spec.user]
        if spec.port:
            args += ["-p", str(spec.port)]
        got = _ssh_g(ssh, [*args, "--", spec.host])
        host = validate.host(got["hostname"][0], f"ssh config HostName of jump host {validate.show(hop)}",
                             resolved_here=True)
        user = validate.user(got["user"][0], f"ssh config User of jump host {validate.show(hop)}")
        port = validate.port(got["port"][0], f"ssh config Port of jump host {validate.show(hop)}")
        out.append(f"{user}@{f'[{host}]' if ':' in host else host}:{port}")
    return out


def tokens(r: Resolved, host_arg: str) -> dict[str, str]:
    """The %-token values of this connection, from ssh's answer."""

    hops = parse_jump(r.one("proxyjump") or "none", "ProxyJump")
    return sshtokens.connection_tokens(
        host=r.one("hostname") or host_arg, port=r.one("port") or "22", user=r.one("user"),
        host_arg=host_arg, conn_hash=r.one("controlpath") or "", key_alias=r.one("hostkeyalias"),
        last_hop=parse_hop(hops[-1]).host if hops else "")   # %j: the hop nearest the server


# ---------------------------------------------------------------- forwards

def forward_lines(r: Resolved) -> tuple[list[str], list[str], list[str]]:
    """(localforward, dynamicforward, remoteforward) lines as ssh -G prints
    them, the phantom dynamicforward lines dropped: dump_cfg_forwards prints
    every LocalForward whose target is a unix path (connect_host NULL) among
    the dynamic ones too, with the same listen address. A TCP target is
    always printed in brackets ("[db]:5432"); anything else is a path
    ("/run/x.sock", and "~/x.sock" too: ssh takes any word with a '/')."""
    local = list(r.settings.get("localforward", []))
    dynamic = list(r.settings.get("dynamicforward", []))
    for line in local:
        listen, _, target = line.partition(" ")
        if not target.startswith("[") and listen in dynamic:
            dynamic.remove(listen)
    return local, dynamic, list(r.settings.get("remoteforward", []))


def _spec_path(text: str) -> str:
    # ssh -G has already expanded the %-tokens of forward paths (expanding
    # again would turn a "%%" that became "%" into an error); it leaves a
    # leading ~, which sshpump expands so that a path here is absolute
    # (only a local one: the server's paths are the server's to read).
    return sshtokens.tilde(text) if text.startswith("~") else text


def local_forward(line: str):
    listen, _, target = line.partition(" ")
    try:
        return parse_local_forward(f"{_spec_path(listen)}:{target}")   # the target is the server's
    except UsageError as e:
        raise UsageError(f"ssh config LocalForward {validate.show(line)}: {e}") from None


def dynamic_forward(line: str):
    try:
        return parse_dynamic_forward(line)
    except UsageError as e:
        raise UsageError(f"ssh config DynamicForward {validate.show(line)}: {e}") from None


# ---------------------------------------------------------------- into Options

def _yes_no(r: Resolved, key: str) -> bool | None:
    value = r.one(key)
    return None if value is None else YES.get(value.lower())


def _ciphers(listed: str) -> str:
    """ssh's list as libssh2 can take it: names libssh2 lacks dropped, ssh's order kept."""
    have = set(validate.supported_ciphers())
    usable = [c for c in listed.split(",") if c in have]
    if not usable:
        raise UsageError(f"ssh config: Ciphers {validate.show(listed)}: libssh2 has none of these "
                         f"(it has: {','.join(validate.supported_ciphers())})")
    return ",".join(usable)


def apply(opts: Options, r: Resolved, host_arg: str, own: set[str]) -> bool | None:
    """Fill opts from ssh's answer. ``own``: -o names the command line gave
    that sshpump reads itself (they win, so the config's are not used).
    Host, user, port and the proxy settings are ssh's answer as it stands
    (the command line's went to ssh -G). Returns the config's BatchMode."""
    values = tokens(r, host_arg)
    opts.host = validate.host(r.one("hostname") or opts.host, "ssh config HostName", resolved_here=True)
    if r.one("port") is not None:
        opts.port = validate.port(r.one("port"), "ssh config Port")
    if r.one("user") is not None:
        opts.user = validate.user(r.one("user"), "ssh config User")
    jump = r.one("proxyjump")
    opts.proxy_jump = [] if jump is None else parse_jump(jump, "ssh config ProxyJump")
    command = r.one("proxycommand")
    opts.proxy_command = None if command in (None, "none") else command
    if r.chosen("identityfile") is not None:
        # The config's files (the command line's go before them, in cli.py);
        # as ssh does, a listed file that does not exist is skipped.
        paths = [sshtokens.expand_path(p, values, "IdentityFile") for p in r.settings["identityfile"]]
        opts.identities = [p for p in paths if os.path.exists(p)]
    if "UserKnownHostsFile" not in own and r.chosen("userknownhostsfile") is not None:
        opts.known_hosts = [sshtokens.tilde(p) for p in r.one("userknownhostsfile").split()]
    if "StrictHostKeyChecking" not in own and r.one("stricthostkeychecking") is not None:
        opts.strict_host_key_checking = STRICT.get(r.one("stricthostkeychecking").lower(), "yes")
    timeout = r.one("connecttimeout")
    if "ConnectTimeout" not in own and timeout not in (None, "none"):
        opts.connect_timeout = validate.seconds(timeout, "ssh config ConnectTimeout") or None
    interval = r.one("serveraliveinterval")
    if "ServerAliveInterval" not in own and interval not in (None, "0"):
        opts.server_alive_interval = validate.seconds(interval, "ssh config ServerAliveInterval")
    count = r.one("serveralivecountmax")
    if "ServerAliveCountMax" not in own and count is not None:
        opts.server_alive_count_max = validate.ascii_int(count, "ssh config ServerAliveCountMax", 0, 2**31 - 1)
    if "Ciphers" not in own and r.chosen("ciphers") is not None:
        opts.ciphers = _ciphers(r.one("ciphers"))
    for name, key, attr in (("IdentitiesOnly", "identitiesonly", "identities_only"),
                            ("ExitOnForwardFailure", "exitonforwardfailure", "exit_on_forward_failure"),
                            ("GatewayPorts", "gatewayports", "gateway_ports")):
        flag = _yes_no(r, key)
        if name not in own and flag is not None:
            setattr(opts, attr, flag)
    return None if "BatchMode" in own else _yes_no(r, "batchmode")


def remote_forward_spec(line: str) -> str:
    """A RemoteForward line as ssh -G prints it ("9000 [localhost]:22",
    "[::1]:9000 /tmp/app.sock") as an ``-R`` spec ("9000:[localhost]:22").
    A remote SOCKS forward (``RemoteForward 9001``) is printed with the
    target "[socks]:0" (no real target has port 0): it becomes "9001"."""
    listen, _, target = line.partition(" ")
    if target == "[socks]:0":
        return listen
    return f"{listen}:{_spec_path(target)}"   # the listen side is the server's


def config_forwards(r: Resolved) -> tuple[list, list[str], list[str]]:
    """The config's LocalForward and DynamicForward as sshpump forwards, its
    RemoteForward lines as ssh -G prints them, and the same as -R specs
    (cli.py parses them and adds them to the command line's -R)."""
    local, dynamic, remote = forward_lines(r)
    forwards = [local_forward(line) for line in local] + [dynamic_forward(line) for line in dynamic]
    return forwards, remote, [remote_forward_spec(line) for line in remote]


# ---------------------------------------------------------------- -G

def _listen_text(end) -> str:
    if end.path is not None:
        return end.path
    if end.host is None:
        return str(end.port)
    return f"[{end.host or '*'}]:{end.port}"


def _target_text(end) -> str:
    return end.path if end.path is not None else f"[{end.host}]:{end.port}"


def describe(opts: Options, batch: bool) -> str:
    """``sshpump -G``: what sshpump will use, one ``key value`` line each,
    keys and forward lines written as ``ssh -G`` writes them."""
    def yn(flag: bool) -> str:
        return "yes" if flag else "no"
    lines = [f"user {opts.user}", f"hostname {opts.host}", f"port {opts.port}",
             f"proxyjump {','.join(opts.proxy_jump) or 'none'}",
             f"proxycommand {opts.proxy_command or 'none'}"]
    lines += [f"identityfile {p}" for p in opts.identity_files()]
    lines += [f"identitiesonly {yn(opts.identities_only)}",
              f"userknownhostsfile {' '.join(opts.known_hosts)}",
              f"stricthostkeychecking {opts.strict_host_key_checking}",
              f"connecttimeout {'none' if opts.connect_timeout is None else f'{opts.connect_timeout:g}'}",
              f"serveraliveinterval {opts.server_alive_interval:g}",
              f"serveralivecountmax {opts.server_alive_count_max}",
              f"ciphers {opts.ciphers}", f"batchmode {yn(batch)}",
              f"exitonforwardfailure {yn(opts.exit_on_forward_failure)}",
              f"gatewayports {yn(opts.gateway_ports)}"]
    for fwd in opts.forwards:
        if fwd.target is None:
            lines.append(f"dynamicforward {_listen_text(fwd.listen)}")
        elif isinstance(fwd, RemoteForward):
            lines.append(f"remoteforward {_listen_text(fwd.listen)} {_target_text(fwd.target)}")
        else:
            lines.append(f"localforward {_listen_text(fwd.listen)} {_target_text(fwd.target)}")
    return "\n".join(lines)
