"""The compiled pump imports, links the libssh2 ssh2-python ships, and its bridge checks pass."""

import os

import ssh2.session


def test_compiled_module_constants():
    from sshpump._pump import lib

    assert lib.PUMP_EV_DONE == 1
    assert lib.PUMP_EV_SESSION_DEAD == 2


def test_one_libssh2_in_process():
    import sshpump.pump  # noqa: F401

    with open(f"/proc/{os.getpid()}/maps") as f:
        libs = {line.split()[-1] for line in f if "libssh2" in line}
    assert len(libs) == 1, libs
    assert "ssh2_python.libs" in next(iter(libs))


def test_session_bridge_self_check():
    from sshpump.pump import session_pointer

    s = ssh2.session.Session()
    assert session_pointer(s)
    assert s.get_timeout() == 0  # the probe value was restored


def test_bridge_refuses_wrong_type():
    import pytest

    from sshpump.errors import BridgeError
    from sshpump.pump import session_pointer

    with pytest.raises(BridgeError):
        session_pointer(object())
