"""Bulk transfers > 1 GiB through one tunnel, checksummed, crossing rekeys."""
from __future__ import annotations

import threading
import time

import pytest

from testbed.client import download_and_verify, upload_and_verify

from helpers import connect, extra_sshd, start_pump, tcp_spec

pytestmark = pytest.mark.slow

NBYTES = 1100 << 20   # 1.1 GiB
LIMIT = 180.0


@pytest.fixture(scope="module")
def rekey_sshd(sshd):
    """An sshd that rekeys every 256 MiB, so every bulk transfer crosses
    several key re-exchanges (OpenSSH's default limit for AES-GCM is far
    higher than 1.1 GiB)."""
    with extra_sshd(sshd, extra_config={"RekeyLimit": "256M"}) as s:
        yield s


def _bounded(fn, *args):
    err = []

    def run():
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001
            err.append(e)
    t = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(LIMIT)
    assert not t.is_alive(), f"{fn.__name__} did not finish within {LIMIT}s"
    if err:
        raise err[0]
    return time.monotonic() - t0


WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])


def _check_clean(p):
    assert p.proc.poll() is None
    err = p.stderr()
    assert "session lost" not in err and "session down" not in err, err
    assert err.count("closed 127.0.0.1") == 1, err


@WORKERS
def test_bulk_download(rekey_sshd, targets, workers):
    with start_pump(rekey_sshd, tcp_spec(targets.tcp["source"]), workers=workers) as p:
        def down():
            with connect(p.listen[0], 60) as s:
                download_and_verify(s, NBYTES, f"bulk-down-{workers}")
        td = _bounded(down)
        print(f"workers={workers}: 1.1 GiB down {NBYTES / td / 1e6:.0f} MB/s")
        _check_clean(p)


@WORKERS
def test_bulk_upload(rekey_sshd, targets, workers):
    with start_pump(rekey_sshd, tcp_spec(targets.tcp["sink"]), workers=workers) as p:
        def up():
            with connect(p.listen[0], 60) as s:
                upload_and_verify(s, NBYTES, f"bulk-up-{workers}")
        tu = _bounded(up)
        print(f"workers={workers}: 1.1 GiB up {NBYTES / tu / 1e6:.0f} MB/s")
        _check_clean(p)


@WORKERS
def test_bulk_default_sshd(sshd, targets, workers):
    """Same volumes against the stock test sshd (no forced rekey): both ways."""
    with start_pump(sshd, tcp_spec(targets.tcp["source"]), tcp_spec(targets.tcp["sink"]),
                    workers=workers) as p:
        def down():
            with connect(p.listen[0], 60) as s:
                download_and_verify(s, NBYTES, f"bulk-down-plain-{workers}")

        def up():
            with connect(p.listen[1], 60) as s:
                upload_and_verify(s, NBYTES, f"bulk-up-plain-{workers}")
        _bounded(down)
        _bounded(up)
        assert p.proc.poll() is None
