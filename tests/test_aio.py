"""The asyncio API in the caller's own loop (uvloop and asyncio's default),
never blocking it."""
from __future__ import annotations

import asyncio

import pytest
import uvloop

import sshpump
import sshpump.aio
from helpers import tcp_spec

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def _kw(sshd, **extra):
    return dict(port=sshd.port, identity=sshd.client_key, known_hosts=sshd.known_hosts,
                identities_only=True, use_agent=False, **extra)


def _run(loop_name, coro):
    loop = LOOPS[loop_name]()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 60))
    finally:
        loop.close()


async def _echo(addr, payload: bytes) -> bytes:
    r, w = await asyncio.open_connection(*addr[:2])
    w.write(payload)
    w.write_eof()
    data = await r.read()
    w.close()
    return data


class Heartbeat:
    """Counts turns of the loop at 5 ms intervals: a loop blocked for the
    whole of an await would count none."""

    def __init__(self):
        self.beats = 0
        self._task = None

    async def _run(self):
        while True:
            await asyncio.sleep(0.005)
            self.beats += 1

    def __enter__(self):
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc):
        self._task.cancel()


@pytest.mark.parametrize("loop_name", list(LOOPS))
@pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
def test_async_with_add_remove_close(sshd, targets, loop_name, workers):
    dest = f"{sshd.user}@{sshd.host}"

    async def scenario():
        with Heartbeat() as hb:
            async with sshpump.aio.forward(dest, tcp_spec(targets.tcp["echo"]), workers=workers,
                                           **_kw(sshd)) as t:
                started_beats = hb.beats
                assert await _echo(t.local_address, b"hello") == b"hello"
                extra = t.add(tcp_spec(targets.tcp["echo"]))
                assert await _echo(extra.address, b"added") == b"added"
                conns = await t.connections()
                assert conns == []   # both ended
                t.remove(extra)
                with pytest.raises(OSError):
                    await _echo(extra.address, b"gone")
                st = await t.stats()
                assert st["state"] == "running" and [f["id"] for f in st["forwards"]] == [t.forwards[0].id]
        # the SSH login ran while the loop kept turning
        assert started_beats >= 3, started_beats
        return True

    assert _run(loop_name, scenario())


@pytest.mark.parametrize("loop_name", list(LOOPS))
def test_await_then_close_and_wait_closed(sshd, targets, loop_name):
    dest = f"{sshd.user}@{sshd.host}"

    async def scenario():
        t = await sshpump.aio.forward(dest, tcp_spec(targets.tcp["echo"]), **_kw(sshd))
        addr = t.local_address
        assert await _echo(addr, b"x") == b"x"
        t.close()
        await t.wait_closed()
        assert t.forwards == []
        with pytest.raises(OSError):
            await _echo(addr, b"closed")

    _run(loop_name, scenario())


@pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
def test_errors_keep_their_type(sshd, targets, tmp_path, workers):
    dest = f"{sshd.user}@{sshd.host}"

    async def scenario():
        with pytest.raises(sshpump.AuthError):
            await sshpump.aio.forward(dest, tcp_spec(targets.tcp["echo"]), workers=workers,
                                      **_kw(sshd, password="wrong") | {"identity": str(tmp_path / "nokey")})
        with pytest.raises(sshpump.HostKeyError):
            await sshpump.aio.forward(dest, tcp_spec(targets.tcp["echo"]), workers=workers,
                                      **_kw(sshd) | {"known_hosts": sshd.wrong_known_hosts})

    _run("uvloop", scenario())
