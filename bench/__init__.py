"""Benchmark harness for sshpump (not shipped with the package).

Run ``python -m bench`` (quick), ``--full`` or ``--smoke``; see bench/README in
``python -m bench --help``.  Everything runs on loopback: its own sshd
(testbed.sshd), its own target servers (bench.servers), PostgreSQL for pgbench.
"""
