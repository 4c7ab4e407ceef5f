"""A network namespace joined to this one by a veth pair, to cut a link.

    with Netns() as ns:                      # ns.host_addr "10.213.x.1", ns.addr "10.213.x.2"
        with Sshd(netns=ns.name, host=ns.addr) as server:
            ...
            ns.partition()                   # from now on every packet is lost, silently
            ns.heal()

A partition here is what a dead router or a cut further along the path does:
packets leave and are lost, and neither end hears of it -- no error on send,
no ICMP, the link and its carrier stay up. Each end's neighbour entry for
the other is pinned (``nud permanent``); ``partition()`` points both at a MAC
address nobody has, so every frame reaches the far veth end as another
host's and is dropped there; ``heal()`` points them back. (Taking a veth end
down is not silent: neighbour resolution fails, the kernel reports "host
unreachable" to the sending TCP socket, and RFC 6069 then undoes its
retransmission backoff -- the very delay a real partition causes. Nor do
netem or tc actions help: the test machine's kernel has neither.)

Needs root and iproute2 (``ip``); ``available()`` says once per process
whether namespaces can be made here, and why not. ``close()`` removes the
namespace and the pair even after a failed start; nothing else is touched.
"""
from __future__ import annotations

import os
import subprocess

from ._util import Service, wait_for

IP = "/usr/sbin/ip"
NOBODY = "02:00:5e:00:53:00"   # locally administered: no interface here has it
_available: tuple[bool, str] | None = None


def _ip(*args, netns=None, check=True):
    argv = [IP, *(["netns", "exec", netns, IP] if netns else []), *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")
    return r


def available() -> tuple[bool, str]:
    """(True, "") if this machine lets us make a namespace with a veth pair;
    else (False, reason). Probed once per process."""
    global _available
    if _available is None:
        if os.geteuid() != 0:
            _available = (False, "network namespaces need root")
        elif not os.path.exists(IP):
            _available = (False, f"{IP} missing (iproute2)")
        else:
            try:
                with Netns(index=255):
                    pass
                _available = (True, "")
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                _available = (False, f"cannot create a network namespace with a veth pair: {e}")
    return _available


class Netns(Service):
    """Namespace ``name`` with loopback up and one end of a veth pair
    (``addr``/30); this namespace holds the other end (``host_addr``).
    Names and the /30 derive from this process's pid (and ``index``), so
    concurrent test processes do not collide."""

    def __init__(self, index: int = 0):
        tag = f"{os.getpid() % 100000}{index:03d}"[-8:]
        self.name = f"sshpump-{tag}"
        self.host_if, self.ns_if = f"sph{tag}", f"spn{tag}"   # at most 15 bytes
        block = (os.getpid() * 7 + index) % 16384              # a /30 inside 10.213.0.0/16
        base = f"10.213.{block >> 6}.{(block & 63) * 4}"
        prefix = base.rsplit(".", 1)[0]
        last = int(base.rsplit(".", 1)[1])
        self.host_addr, self.addr = f"{prefix}.{last + 1}", f"{prefix}.{last + 2}"
        self.made = False

    def start(self):
        self.made = True
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("link", "set", "lo", "up", netns=self.name)
        _ip("addr", "add", f"{self.addr}/30", "dev", self.ns_if, netns=self.name)
        _ip("link", "set", self.ns_if, "up", netns=self.name)
        self.macs = (self._mac(self.host_if), self._mac(self.ns_if, self.name))
        self.heal()
        return self

    @staticmethod
    def _mac(dev, netns=None) -> str:
        out = _ip("-o", "link", "show", "dev", dev, netns=netns).stdout.split()
        return out[out.index("link/ether") + 1]

    def _point(self, host_mac, ns_mac):
        """This side's entry for the namespace's address, and the other way round."""
        _ip("neigh", "replace", self.addr, "lladdr", ns_mac, "dev", self.host_if, "nud", "permanent")
        _ip("neigh", "replace", self.host_addr, "lladdr", host_mac, "dev", self.ns_if, "nud", "permanent",
            netns=self.name)

    def partition(self):
        """Cut the path: from now on nothing crosses it, and nobody is told."""
        self._point(NOBODY, NOBODY)

    def heal(self):
        """Restore the path."""
        self._point(*self.macs)

    def exec_argv(self, argv) -> list[str]:
        """argv run inside the namespace."""
        return [IP, "netns", "exec", self.name, *argv]

    def stop(self):
        if not self.made:
            return
        self.made = False
        # Deleting the link removes both ends at once; the namespace's own
        # teardown is asynchronous in the kernel, so wait for the link to go.
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.name, check=False)
        wait_for(lambda: not os.path.exists(f"/sys/class/net/{self.host_if}"), 10, 0.05,
                 what=f"{self.host_if} removed")
