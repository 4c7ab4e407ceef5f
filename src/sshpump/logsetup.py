"""Logging to stderr, one line per event, never a secret."""

import logging
import os
import sys


def setup_logging(verbose: int, prefix: str | None = None) -> None:
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
    prefix = prefix or f"sshpump[{os.getpid()}]"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    log = logging.getLogger("sshpump")
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
