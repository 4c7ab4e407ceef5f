"""Which libssh2 this process runs on: sshpump's patched build, loaded first.

ssh2-python's extension modules (and our pump) need a library with the
wheel's soname, ``libssh2-<hash>.so.1.0.1``. The dynamic linker satisfies that
name with an already-loaded library of the same soname, so loading our
patched build (``sshpump/_libssh2/``, made by ``csrc/build_libssh2.py``) with
RTLD_GLOBAL before anything imports ``ssh2`` makes every libssh2 call in the
process go to it. Its libcrypto is the wheel's own, loaded by path first.

This module runs from ``sshpump/__init__.py`` before any ``ssh2`` import. It
never refuses: when the patched library cannot be used, it says why in one
warning line and the stock library serves (slower, same behaviour).
``SSHPUMP_LIBSSH2=stock`` selects the stock library on purpose.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass

ENV = "SSHPUMP_LIBSSH2"
IDENT_SYMBOL = "sshpump_libssh2_build"
HERE = os.path.dirname(os.path.abspath(__file__))
PATCHED_DIR = os.path.join(HERE, "_libssh2")

log = logging.getLogger("sshpump")


@dataclass(frozen=True)
class Libssh2:
    """The libssh2 mapped into this process."""

    patched: bool
    path: str           # the library file mapped into the process
    openssl: str        # OpenSSL_version() of the libcrypto it uses
    why_stock: str = ""  # empty when patched

    @property
    def kind(self) -> str:
        return "patched" if self.patched else "stock"


def _wheel_libs() -> tuple[str, str]:
    """(stock libssh2, libcrypto) bundled in ssh2-python's wheel, found without importing it."""
    spec = importlib.util.find_spec("ssh2")
    if spec is None or not spec.submodule_search_locations:
        return "", ""
    libs = os.path.join(os.path.dirname(list(spec.submodule_search_locations)[0]), "ssh2_python.libs")
    try:
        names = sorted(os.listdir(libs))
    except OSError:
        return "", ""
    ssh2 = next((n for n in names if n.startswith("libssh2-")), "")
    crypto = next((n for n in names if n.startswith("libcrypto-")), "")
    return (os.path.join(libs, ssh2) if ssh2 else "", os.path.join(libs, crypto) if crypto else "")


def mapped_libssh2() -> list[str]:
    """Paths of every libssh2 file mapped into this process (from /proc/self/maps)."""
    paths = set()
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.rstrip("\n").split(None, 5)[-1]
            if "libssh2" in os.path.basename(path):
                paths.add(path)
    return sorted(paths)


def _openssl_version(libcrypto: str) -> str:
    try:
        fn = ctypes.CDLL(libcrypto).OpenSSL_version
    except (OSError, AttributeError):
        return "OpenSSL unknown"
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.c_int]
    return fn(0).decode()


def _has_ident() -> bool:
    try:
        getattr(ctypes.CDLL(None), IDENT_SYMBOL)
    except AttributeError:
        return False
    return True


def _preload(stock: str, libcrypto: str) -> str:
    """Load the patched build; returns why not, or "" when it is loaded."""
    if os.environ.get(ENV, "").strip().lower() == "stock":
        return f"{ENV}=stock"
    if os.environ.get(ENV, "").strip().lower() not in ("", "patched"):
        return f"{ENV}={os.environ[ENV]!r} is neither 'patched' nor 'stock'"
    if not stock or not libcrypto:
        return "ssh2-python's bundled libssh2 was not found"
    if any(m == "ssh2" or m.startswith("ssh2.") for m in sys.modules) or mapped_libssh2():
        return "ssh2 was imported before sshpump; import sshpump first"
    patched = os.path.join(PATCHED_DIR, os.path.basename(stock))
    if not os.path.exists(patched):
        return f"no patched build for {os.path.basename(stock)} in {PATCHED_DIR} (reinstall sshpump)"
    try:
        ctypes.CDLL(libcrypto, mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(patched, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return f"cannot load {patched}: {e}"
    return ""


def _load() -> Libssh2:
    stock, libcrypto = _wheel_libs()
    why = _preload(stock, libcrypto)
    import ssh2.session  # noqa: F401  (binds ssh2-python to whatever is loaded now)

    mapped = mapped_libssh2()
    path = mapped[0] if len(mapped) == 1 else ", ".join(mapped)
    patched = not why and len(mapped) == 1 and _has_ident() and \
        os.path.dirname(os.path.realpath(mapped[0])) == os.path.realpath(PATCHED_DIR)
    if not why and not patched:
        why = f"the process maps {path or 'no libssh2'} instead of the patched build"
    if why and os.environ.get(ENV, "").strip().lower() != "stock":
        log.warning("sshpump: warning: running on ssh2-python's stock libssh2 (slower bulk transfers): %s", why)
    return Libssh2(patched=patched, path=path, openssl=_openssl_version(libcrypto), why_stock=why)


LOADED = _load()
