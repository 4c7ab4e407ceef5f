"""sshpump test bed: real OpenSSH sshd, target servers, PostgreSQL, ssh-agent,
and a fault-injecting SSH server/proxy.  Used by tests/ and benchmarks; not
shipped with the product.

Submodules are imported lazily; use e.g. ``from testbed.sshd import Sshd``.
"""
from __future__ import annotations

import importlib
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_EXPORTS = {
    "Sshd": "testbed.sshd",
    "Targets": "testbed.targets",
    "Postgres": "testbed.postgres",
    "SshAgent": "testbed.agent",
    "FaultServer": "testbed.faultserver",
    "pattern_chunks": "testbed.data",
    "pattern_digest": "testbed.data",
    "pattern_bytes": "testbed.data",
    "echo_roundtrip": "testbed.client",
    "upload_and_verify": "testbed.client",
    "download_and_verify": "testbed.client",
}

__all__ = sorted(_EXPORTS) + ["REPO_ROOT"]


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'testbed' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
