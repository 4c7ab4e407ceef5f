"""Two-way traffic through one tunnel: both directions move (none starves or
stalls), and a client's connections reach the target in the order it opened
them, across workers (iperf3 --bidir pairs its streams by arrival order)."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading

import pytest

from helpers import connect, run_concurrently, start_pump, tcp_spec
from testbed._util import free_port
from testbed.client import download_and_verify, echo_roundtrip, upload_and_verify

MiB = 1 << 20


class OrderTarget:
    """Accepts connections and records, in accept order, the index each
    connection's client sends first."""

    def __init__(self):
        self.lsock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.addr = self.lsock.getsockname()[:2]
        self.order: list[int] = []
        self.lock = threading.Lock()
        self.slots = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                slot = len(self.slots)
                self.slots.append(None)
            threading.Thread(target=self._read, args=(conn, slot), daemon=True).start()

    def _read(self, conn, slot):
        with conn:
            data = b""
            while not data.endswith(b"\n"):
                b = conn.recv(64)
                if not b:
                    break
                data += b
            with self.lock:
                self.slots[slot] = int(data)
            conn.sendall(b"ok")

    def close(self):
        self.lsock.close()


@pytest.mark.parametrize("workers", [2, 4])
def test_connections_reach_the_target_in_the_order_the_client_opened_them(sshd, workers):
    target = OrderTarget()
    try:
        with start_pump(sshd, tcp_spec(target.addr), workers=workers, verbose=0) as p:
            for round_ in range(5):
                socks = [connect(p.listen[0]) for _ in range(20)]   # back to back
                for i, s in enumerate(socks):
                    s.sendall(b"%d\n" % (round_ * 100 + i))
                for s in socks:
                    assert s.recv(2) == b"ok"
                    s.close()
        got = [x for x in target.slots if x is not None]
        assert len(got) == 100
        assert got == sorted(got), got
    finally:
        target.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_upload_and_download_at_once_both_progress_intact(sshd, targets, workers):
    """A 256 MiB upload and a 256 MiB download at the same time, and a 64 MiB
    echo both ways on one connection: all checksummed, none starved."""
    with start_pump(sshd, tcp_spec(targets.tcp["sink"]), tcp_spec(targets.tcp["source"]),
                    tcp_spec(targets.tcp["echo"]), workers=workers) as p:
        def up():
            with connect(p.listen[0], 120) as s:
                upload_and_verify(s, 256 * MiB, "bidir-up")

        def down():
            with connect(p.listen[1], 120) as s:
                download_and_verify(s, 256 * MiB, "bidir-down")

        def echo():
            with connect(p.listen[2], 120) as s:
                echo_roundtrip(s, bytes(range(256)) * (256 * 1024), half_close=True)

        run_concurrently([up, down, echo], 240, "a direction (stalled?)")
        assert p.proc.poll() is None, p.stderr()


@pytest.mark.skipif(not shutil.which("iperf3"), reason="iperf3 is not installed")
def test_iperf3_bidir_through_default_workers(sshd):
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        with start_pump(sshd, f"0:127.0.0.1:{port}", verbose=0, workers=2) as p:
            r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(p.listen[0][1]), "--bidir", "-t", "3", "-J"],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr
            end = json.loads(r.stdout)["end"]
            up = end["sum_received"]["bytes"]
            down = end["sum_received_bidir_reverse"]["bytes"]
            print(f"iperf3 --bidir: up {end['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s, "
                  f"down {end['sum_received_bidir_reverse']['bits_per_second'] / 1e9:.2f} Gbit/s")
            # both directions carried data the whole time (a stall moves ~10 MB, then nothing)
            assert up > 100 * MiB and down > 100 * MiB, (up, down)
    finally:
        server.terminate()
        server.wait()
