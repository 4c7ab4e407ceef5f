"""A private ssh-agent (``ssh-agent -D -a SOCK``) for tests."""
from __future__ import annotations

import os
import stat
import subprocess
import tempfile

from ._util import Service, wait_for

SSH_AGENT = "/usr/bin/ssh-agent"
SSH_ADD = "/usr/bin/ssh-add"


class SshAgent(Service):
    """Constructor: ``SshAgent()``.

    Attributes: sock (path of the agent socket), env ({"SSH_AUTH_SOCK": sock}),
    pid, tmpdir, proc.
    Methods: start(), stop(), add(key_path, passphrase=None),
    remove_all(), list_keys() -> list of ``ssh-add -l`` lines (empty if none).
    """

    def __init__(self):
        self.tmpdir = tempfile.mkdtemp(prefix="sshpump-agent-")
        self.sock = os.path.join(self.tmpdir, "agent.sock")
        self.env = {"SSH_AUTH_SOCK": self.sock}
        self.proc = None
        self.pid = None

    def start(self):
        self.proc = subprocess.Popen([SSH_AGENT, "-D", "-a", self.sock],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ssh-agent exited with {self.proc.returncode}")
            return os.path.exists(self.sock) and stat.S_ISSOCK(os.stat(self.sock).st_mode)

        wait_for(ready, 10, what="ssh-agent socket")
        return self

    def _ssh_add(self, *args, passphrase=None, check=True):
        env = dict(os.environ, **self.env)
        env.pop("DISPLAY", None)
        askpass = None
        if passphrase is not None:
            askpass = os.path.join(self.tmpdir, "askpass.sh")
            with open(os.path.join(self.tmpdir, "passphrase"), "w") as f:
                f.write(passphrase)
            with open(askpass, "w") as f:
                f.write(f"#!/bin/sh\ncat '{self.tmpdir}/passphrase'\n")
            os.chmod(askpass, 0o700)
            env.update(SSH_ASKPASS=askpass, SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        try:
            r = subprocess.run([SSH_ADD, *args], env=env, capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, timeout=30)
        finally:
            if askpass:
                for p in (askpass, os.path.join(self.tmpdir, "passphrase")):
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass
        if check and r.returncode != 0:
            raise RuntimeError(f"ssh-add {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def add(self, key_path: str, passphrase: str | None = None):
        """Add a private key (an encrypted one needs ``passphrase``)."""
        self._ssh_add(key_path, passphrase=passphrase)
        return self

    def remove_all(self):
        self._ssh_add("-D")

    def list_keys(self) -> list[str]:
        r = self._ssh_add("-l", check=False)
        if r.returncode == 1:  # "The agent has no identities."
            return []
        if r.returncode != 0:
            raise RuntimeError(f"ssh-add -l failed: {r.stderr.strip()}")
        return [ln for ln in r.stdout.splitlines() if ln.strip()]

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

