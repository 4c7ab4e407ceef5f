"""The control socket: protocol.py (JSON lines), server.py (in the running
sshpump), client.py (``sshpump ctl``). Nothing is imported here, so that
``python -m sshpump.control.client`` runs without a double import."""
