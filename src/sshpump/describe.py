"""How the worker's log lines name peers, errors and failed opens."""

from __future__ import annotations

import os


def open_reason(session) -> str:
    """libssh2 says e.g. "Channel open failure (administratively prohibited)"."""
    try:
        text = session.last_error() or ""
    except Exception:  # noqa: BLE001 - diagnostics only
        text = ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    if "(" in text and text.endswith(")"):
        return text[text.rindex("(") + 1 : -1]
    return text or "channel open failed"


def peer_text(peer) -> str:
    """(host, port) as host:port, [v6]:port; anything else as it is."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in str(host) else f"{host}:{peer[1]}"
    return str(peer)


def err_text(err: int) -> str:
    """errno > 0 as its text; libssh2's negative codes by number."""
    if err > 0:
        return os.strerror(err)
    return f"libssh2 error {err}"
