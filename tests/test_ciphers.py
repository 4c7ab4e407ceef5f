"""Every cipher the patched libssh2 crypts whole packets for: > 1 GiB each way,
checksummed, across forced rekeys, with the server offering only that cipher
(and MAC), so the negotiation cannot pick another."""
from __future__ import annotations

import pytest

from helpers import connect, extra_sshd, start_pump, tcp_spec
from test_bulk import NBYTES, _bounded
from testbed.client import download_and_verify, upload_and_verify

pytestmark = pytest.mark.slow

SUITES = [
    ("aes128-gcm@openssh.com", None),
    ("aes256-gcm@openssh.com", None),
    ("aes128-ctr", "hmac-sha2-256"),
    ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
    ("chacha20-poly1305@openssh.com", None),
]


@pytest.mark.parametrize("cipher,mac", SUITES, ids=[c + ("+" + m if m else "") for c, m in SUITES])
def test_cipher_bulk_both_ways_across_rekeys(sshd, targets, cipher, mac):
    # DEBUG1: sshd logs every key exchange with the cipher and MAC it chose
    config = {"RekeyLimit": "256M", "Ciphers": cipher, "LogLevel": "DEBUG1"}
    if mac:
        config["MACs"] = mac
    with extra_sshd(sshd, extra_config=config) as server:
        with start_pump(server, tcp_spec(targets.tcp["source"]), tcp_spec(targets.tcp["sink"]),
                        workers=0, extra=["-o", f"Ciphers={cipher}"]) as p:
            def down():
                with connect(p.listen[0], 60) as s:
                    download_and_verify(s, NBYTES, f"cipher-down-{cipher}-{mac}")

            def up():
                with connect(p.listen[1], 60) as s:
                    upload_and_verify(s, NBYTES, f"cipher-up-{cipher}-{mac}")
            td = _bounded(down)
            tu = _bounded(up)
            print(f"{cipher} {mac or ''}: down {NBYTES / td / 1e6:.0f} MB/s, up {NBYTES / tu / 1e6:.0f} MB/s")
            assert p.proc.poll() is None, p.stderr()
            err = p.stderr()
            assert "session lost" not in err and "session down" not in err, err
            assert err.count("closed 127.0.0.1") == 2, err
        log = server.log()
    chosen = f"client->server cipher: {cipher} MAC: {mac or '<implicit>'}"
    # the first exchange and a rekey every 256 MiB of 2.2 GiB
    assert log.count(chosen) >= 5, [line for line in log.splitlines() if "cipher:" in line]
