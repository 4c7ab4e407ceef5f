"""Process set-up shared by the master and workers: logging and fd limits."""

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


def raise_fd_limit() -> None:
    """Every client costs a worker one fd (and the master one, briefly): use the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
