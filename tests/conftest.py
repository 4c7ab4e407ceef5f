"""Shared fixtures: real OpenSSH sshd, target servers, PostgreSQL, ssh-agent.

Session-scoped: ``sshd``, ``targets``, ``postgres``.  Function-scoped: ``agent``.
Requires root and scripts/install-system-deps.sh to have been run.
"""
from __future__ import annotations

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("test bed needs root (sshd, chpasswd, postgres user)")


@pytest.fixture(scope="session")
def sshd():
    _need_root()
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("openssh-server not installed; run scripts/install-system-deps.sh")
    from testbed.sshd import Sshd
    with Sshd() as s:
        yield s


@pytest.fixture(scope="session")
def targets():
    from testbed.targets import Targets
    with Targets() as t:
        yield t


@pytest.fixture(scope="session")
def postgres():
    _need_root()
    from testbed.postgres import PG_BIN, Postgres
    if not os.path.exists(os.path.join(PG_BIN, "initdb")):
        pytest.skip("postgresql-15 not installed; run scripts/install-system-deps.sh")
    with Postgres() as pg:
        pg.init_pgbench()
        yield pg


@pytest.fixture
def agent():
    from testbed.agent import SshAgent
    with SshAgent() as a:
        yield a


@pytest.fixture
def pump(sshd):
    """Factory: ``pump(*specs, workers=0, verbose=1, extra=(), env=None, ...)``
    starts the sshpump CLI against ``sshd`` (see tests/helpers.py) and always
    stops it at teardown."""
    from helpers import start_pump
    started = []

    def start(*specs, **kw):
        p = start_pump(sshd, *specs, **kw)
        started.append(p)
        return p

    yield start
    # Teardown: every pump the test started is idle again -- no connection
    # open or waiting, nothing buffered, no fd more than at the start -- unless
    # the test said otherwise (p.check_idle = False) or the pump has exited.
    problems = []
    for p in started:
        try:
            if p.check_idle and p.control and p.proc.poll() is None:
                p.assert_idle()
        except AssertionError as e:
            problems.append(str(e))
        finally:
            p.close()
    assert not problems, problems
