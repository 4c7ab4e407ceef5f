"""A boot error in any worker stops sshpump at once with that error's exit
code and one line on stderr, however many workers there are."""
from __future__ import annotations

import subprocess

import pytest

from helpers import base_args, clean_env, run_cli, tcp_spec


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_auth_failure_is_one_line_and_exit_5(sshd, targets, tmp_path, workers):
    wrong = str(tmp_path / "wrong_ed25519")   # a key the server does not accept
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", wrong], check=True)
    args, dest = base_args(sshd, key=wrong)
    rc, err = run_cli(["--workers", str(workers), *args, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                       "-L", tcp_spec(targets.tcp["echo"]), dest], env=clean_env())
    lines = err.splitlines()
    assert rc == 5 and len(lines) == 1, err
    assert lines[0].startswith("sshpump: authentication failed for"), err


@pytest.mark.parametrize("workers", [0, 4])
def test_host_key_mismatch_is_one_line_and_exit_4(sshd, targets, workers):
    args, dest = base_args(sshd, known_hosts=sshd.wrong_known_hosts)
    rc, err = run_cli(["--workers", str(workers), *args, "-L", tcp_spec(targets.tcp["echo"]), dest],
                      env=clean_env())
    assert rc == 4 and len(err.splitlines()) == 1 and "does NOT match" in err, err
