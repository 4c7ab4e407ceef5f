"""Helpers around the OpenSSH programs for the throwaway sshd (sshd.py) and
the demo: where the programs are, key generation, free ports, process trees,
and two questions about this machine's sshd (locked accounts, penalties)."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess

CIPHERS = ("aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
           "aes128-ctr,aes192-ctr,aes256-ctr")
_SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def program(name: str) -> str | None:
    """Absolute path of an OpenSSH program (sshd must be started by absolute path)."""
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + _SBIN)


SSHD = program("sshd") or "/usr/sbin/sshd"
SSH = program("ssh") or "/usr/bin/ssh"
SSH_KEYGEN = program("ssh-keygen") or "/usr/bin/ssh-keygen"


# -- small helpers (also used by the demo) -------------------------------------
def keygen(path: str, ktype: str, passphrase: str = "", comment: str = "") -> None:
    args = [SSH_KEYGEN, "-q", "-t", ktype, "-N", passphrase, "-C", comment, "-f", path]
    if ktype == "rsa":
        args[3:3] = ["-b", "3072"]
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL)
    os.chmod(path, 0o600)
    os.chmod(path + ".pub", 0o644)


def public_key(path: str) -> str:
    """``"type base64"`` of the key at ``path`` (reads ``path.pub``)."""
    with open(path + ".pub") as f:
        parts = f.read().split()
    return f"{parts[0]} {parts[1]}"


def free_port(host: str = "127.0.0.1", also_v6: bool = False) -> int:
    """Bind port 0, read the port, close.  Racy by nature; callers retry."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not also_v6:
            return port
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                s6.bind(("::1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("could not find a free port")


def read_from(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def descendants(pid: int) -> list[int]:
    """All descendant pids of ``pid`` (via /proc), deepest last."""
    ppids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        ppids.setdefault(int(stat[stat.rfind(")") + 2:].split()[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in ppids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_pids(pids, sig=signal.SIGKILL) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def account_locked(user: str) -> bool:
    """Would sshd without PAM call ``user``'s account locked?  (Its shadow
    password field, or the passwd one when shadow is not readable, starts
    with ``!`` -- LOCKED_PASSWD_PREFIX on Linux.)"""
    import ctypes

    passwd = None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.getspnam.restype = ctypes.POINTER(ctypes.c_char_p * 2)   # sp_namp, sp_pwdp
        libc.getspnam.argtypes = [ctypes.c_char_p]
        spw = libc.getspnam(user.encode())
        if spw:
            passwd = spw.contents[1]
    except (OSError, AttributeError):
        pass
    if passwd is None:
        try:
            passwd = pwd.getpwnam(user).pw_passwd.encode()
        except KeyError:
            return False
    return passwd.startswith(b"!")


_penalties_supported: bool | None = None


def penalties_supported(tmpdir: str, hostkey: str) -> bool:
    """Does this sshd understand ``PerSourcePenalties``? (OpenSSH >= 9.8)"""
    global _penalties_supported
    if _penalties_supported is None:
        cfg = os.path.join(tmpdir, "probe_config")
        with open(cfg, "w") as f:
            f.write(f"HostKey {hostkey}\nPerSourcePenalties no\nUsePAM no\n")
        r = subprocess.run([SSHD, "-t", "-f", cfg], capture_output=True, text=True)
        os.unlink(cfg)
        _penalties_supported = r.returncode == 0
    return _penalties_supported
