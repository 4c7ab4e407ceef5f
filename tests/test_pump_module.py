"""The compiled pump imports, links the libssh2 soname ssh2-python ships, and its bridge checks pass."""

import sshpump  # noqa: F401  (first: it loads the patched libssh2)
import ssh2.session  # noqa: I001


def test_compiled_module_constants():
    from sshpump._pump import lib

    assert lib.PUMP_EV_DONE == 1
    assert lib.PUMP_EV_SESSION_DEAD == 2


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
