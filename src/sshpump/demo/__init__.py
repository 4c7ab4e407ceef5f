"""``sshpump demo``: a first run that needs no bastion (see app.py), and the
throwaway sshd launcher the demo, the test bed and the bench share (sshd.py)."""
from __future__ import annotations


def main(argv=None) -> int:
    from .app import main as app_main

    return app_main(argv)
