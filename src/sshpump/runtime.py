"""The running process: a set of tunnels, each supervised on its own, the
signals, the control socket, and reloading a --config file.

One tunnel from the command line or the library is run ``fail_fast``: a boot
error (authentication, host key) stops everything with that error. Tunnels of
a --config file are independent (one_for_one): one bastion down or refusing
our key never disturbs the others; SIGHUP re-reads the file and applies the
difference without touching the tunnels that did not change."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from .errors import SshpumpError, UsageError
from .obs.metrics import Metrics
from .logfmt import fields
from .options import Options
from .tunnel import TunnelService

log = logging.getLogger("sshpump")


class Runtime:
    def __init__(self, *, control_path: str | None = None, config_path: str | None = None):
        self.tunnels: dict[str, TunnelService] = {}
        self.control_path = control_path
        self.config_path = config_path
        self.file_config = None          # the tunnelfile.FileConfig last applied
        self.started_at = time.monotonic()
        self.control = None
        self.fatal: SshpumpError | None = None
        self.drain_timeout = None        # set by a drain/stop command; else each tunnel's own
        self.secrets = (None, None, 0)   # password, passphrase, verbosity: for tunnels a reload starts
        self._stop_requested = asyncio.Event()
        self._reloading = None
        self.on_stopping = []            # callables, told once when the drain begins (systemd's STOPPING=1)
        self.on_reloaded = []            # callables(applied: dict), after a reload (systemd's STATUS=)
        self.metrics = Metrics(self)     # totals by tunnel name; .registry for Prometheus (obs/)
        self.on_reloading = []           # callables, when a reload starts (systemd's RELOADING=1)
        self.on_reload_done = []         # callables, when it has ended, applied or not (READY=1 again)

    @property
    def single(self) -> bool:
        return self.config_path is None

    # ---- start -------------------------------------------------------------

    def _tunnel(self, name: str, opts: Options) -> TunnelService:
        return TunnelService(name, opts, fail_fast=self.single, on_failed=self._tunnel_failed,
                             prefix="" if self.single else f"tunnel {name}: ", counters=self.metrics.tunnel(name))

    async def start(self, tunnels: list[tuple[str, Options]]) -> bool:
        """Start the tunnels and the control socket. Raises what stops a
        fail-fast tunnel; False when a stop was requested meanwhile."""
        try:
            started = await self._unless_stopped(self._start_all(tunnels))
        except BaseException:
            await self._close_everything(0)
            raise
        if not started:
            await self._close_everything(0)
            return False
        return True

    async def _start_all(self, tunnels):
        if self.control_path:
            from .control.server import ControlServer

            self.control = ControlServer(self.control_path, self.command)
            await self.control.start()
        failures = []
        for name, opts in tunnels:
            t = self._tunnel(name, opts)
            self.tunnels[name] = t
            try:
                await t.start()
            except SshpumpError as e:
                if self.single:
                    raise
                failures.append(e)
                del self.tunnels[name]
                log.error("tunnel %s: %s (not started)", name, e,
                          extra=fields("tunnel_failed", tunnel=name, reason=str(e)))
        if tunnels and not self.tunnels:
            raise failures[0]

    async def _unless_stopped(self, coro) -> bool:
        """Run coro to its end unless a stop is requested first (a signal
        while the workers log in): then cancel it and return False."""
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stop_requested.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if self.fatal is not None:
            # The stop came from a boot error (a second worker's, while the
            # first one's was still being handled): that error is the answer.
            raise self.fatal
        return False

    def _tunnel_failed(self, err: SshpumpError):
        """A fail-fast tunnel's worker could not boot: stop with its error."""
        if self.fatal is None:
            self.fatal = err
        self.request_stop()

    # ---- run and stop --------------------------------------------------------

    def request_stop(self, drain_timeout: float | None = None):
        if drain_timeout is not None:
            self.drain_timeout = drain_timeout
        if not self._stop_requested.is_set():
            self._stop_requested.set()
            for fn in self.on_stopping:
                fn()

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    async def serve(self):
        """Until a stop: then drain and close; raises the error that stopped
        a fail-fast tunnel."""
        try:
            await self._stop_requested.wait()
            await self._close_everything(None)
        finally:
            for t in self.tunnels.values():
                t.close_listeners()  # on any way out: no unix socket file stays behind
        if self.fatal is not None:
            raise self.fatal

    async def _close_everything(self, grace):
        if self.control is not None:
            await self.control.close()
        await asyncio.gather(*(t.stop(self._grace(t, grace)) for t in self.tunnels.values()))

    def _grace(self, t, grace):
        if grace is not None:
            return grace
        return self.drain_timeout if self.drain_timeout is not None else t.opts.drain_timeout

    def handle_signals(self):
        """SIGTERM/SIGINT: drain and stop; SIGHUP: reload the --config file.
        Main thread only; call before start() so that a signal during start-up
        still closes the listeners."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, sig):
        # The workers drain on the same signal when the whole process group
        # got it, and on the master's drain message otherwise; a repeated
        # signal changes nothing (the drain is bounded by --drain-timeout).
        if self.stopping:
            log.info("%s: already stopping", sig.name)
            return
        timeouts = sorted({t.opts.drain_timeout for t in self.tunnels.values()}) or [0]
        log.info("%s: draining (up to %gs)", sig.name, timeouts[-1], extra=fields("draining", reason=sig.name))
        self.request_stop()

    def _on_hup(self):
        if self.config_path is None:
            # A daemon without a configuration file has nothing to reload; a
            # closed terminal or a stray `kill -HUP` must not stop the tunnels.
            log.warning("SIGHUP: nothing to reload (no configuration file); still running",
                        extra=fields("reload_skipped", reason="no configuration file"))
            return
        if self._reloading is not None and not self._reloading.done():
            log.warning("SIGHUP: a reload is still running; ignored",
                        extra=fields("reload_skipped", reason="a reload is still running"))
            return
        self._reloading = asyncio.ensure_future(self.reload())

    # ---- reload ------------------------------------------------------------

    async def reload(self) -> dict:
        """Re-read the --config file and apply the difference. A file that
        does not load is rejected with one line; the running set is kept."""
        for fn in self.on_reloading:
            fn()
        try:
            return await self._reload()
        finally:
            for fn in self.on_reload_done:
                fn()

    async def _reload(self) -> dict:
        from . import reloadplan, tunnelfile

        try:
            new = tunnelfile.load(self.config_path)
        except UsageError as e:
            log.error("reload: %s; keeping the running tunnels", e, extra=fields("reload_failed", reason=str(e)))
            raise
        old = self.file_config.tunnels if self.file_config else {}
        for cfg in new.tunnels.values():   # what the file cannot hold comes from the start
            cfg.opts.password, cfg.opts.passphrase, cfg.opts.verbose = self.secrets
        plan = reloadplan.plan(old, new.tunnels)
        applied = await self._apply(plan)
        # A tunnel that failed to start is left out of what was applied, so
        # that the next reload tries it again.
        for name in list(new.tunnels):
            if name not in self.tunnels:
                del new.tunnels[name]
        self.file_config = new
        log.info("reload: %s", ", ".join(f"{k} {v}" for k, v in applied.items() if v) or "nothing changed",
                 extra=fields("reload"))
        for fn in self.on_reloaded:
            fn(applied)
        return applied

    async def _apply(self, plan) -> dict:
        applied = {"added": [], "removed": [], "restarted": [], "forwards added": 0, "forwards removed": 0}
        # Removals first: a forward or tunnel may move to a port another frees.
        for name in plan.removed:
            t = self.tunnels.pop(name, None)
            if t is not None:
                await t.stop(t.opts.drain_timeout)
                applied["removed"].append(name)
        for name, specs in plan.forwards_removed.items():
            t = self.tunnels.get(name)
            for spec in specs if t else ():
                try:
                    t.remove(spec.spec)
                    applied["forwards removed"] += 1
                except SshpumpError as e:
                    log.warning("reload: tunnel %s: %s", name, e,
                                extra=fields("reload_failed", tunnel=name, reason=str(e)))
        for cfg in plan.restarted:
            old = self.tunnels.pop(cfg.name, None)
            if old is not None:
                await old.stop(old.opts.drain_timeout)
            if await self._start_one(cfg.name, cfg.opts):
                applied["restarted"].append(cfg.name)
        for name, specs in plan.forwards_added.items():
            t = self.tunnels.get(name)
            for spec in specs if t else ():
                try:
                    t.add(spec)
                    applied["forwards added"] += 1
                except SshpumpError as e:
                    log.error("reload: tunnel %s: forward %s: %s", name, spec.spec, e,
                              extra=fields("reload_failed", tunnel=name, reason=str(e)))
        for cfg in plan.added:
            if await self._start_one(cfg.name, cfg.opts):
                applied["added"].append(cfg.name)
        return applied

    async def _start_one(self, name, opts) -> bool:
        t = self._tunnel(name, opts)
        try:
            await t.start()
        except SshpumpError as e:
            log.error("tunnel %s: %s (not started)", name, e,
                      extra=fields("tunnel_failed", tunnel=name, reason=str(e)))
            return False
        self.tunnels[name] = t
        return True

    # ---- the control socket ------------------------------------------------

    async def command(self, cmd: str, args: dict):
        from .commands import run_command

        return await run_command(self, cmd, args)

    def remote_forwards(self) -> list[dict]:
        """-R forwards: where the server listens for us (the --ready-fd line)."""
        return [{"tunnel": t.name, "id": fwd.id, "spec": fwd.spec.spec, "bind": fwd.remote["bind"],
                 "port": fwd.remote["port"], "state": fwd.remote["state"], "target": str(fwd.route.target)}
                for t in self.tunnels.values() for fwd in t.table if fwd.remote is not None]

    def listening(self) -> list[dict]:
        """Every forward's listening addresses (the --ready-fd line)."""
        out = []
        for t in self.tunnels.values():
            for fwd in t.table:
                for addr in fwd.addresses:
                    out.append({"tunnel": t.name, "id": fwd.id, "spec": fwd.spec.spec,
                                "address": list(addr) if isinstance(addr, tuple) else addr})
        return out
