"""Process set-up shared by the master and workers: logging and fd limits."""

import logging
import os
import signal
import sys

# Signals sshpump handles (drain, or log and go on). Workers are born with
# them blocked and unblock them once their handlers are in place: a signal to
# the whole process group while a worker is still importing (a good part of a
# second) then waits for the handler instead of killing the worker, or of
# printing a KeyboardInterrupt traceback.
HANDLED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


LOG_FORMAT = {"format": "text"}   # what this process's log uses; workers are told the same


def setup_logging(verbose: int, prefix: str | None = None, log_format: str = "text",
                  context: dict | None = None) -> None:
    """``context``: fields every record of this process carries in the JSON
    format (a worker's tunnel and index; see logfmt.Context)."""
    LOG_FORMAT["format"] = log_format
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
    prefix = prefix or f"sshpump[{os.getpid()}]"
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from .logfmt import Context, JsonFormatter

        handler.setFormatter(JsonFormatter())
        if context:
            handler.addFilter(Context(**context))
        # Other loggers' warnings (asyncio's, say) would otherwise reach
        # stderr as plain text through logging's last resort: one JSON line
        # each instead.
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.WARNING)
        logging.captureWarnings(True)
    else:
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
