"""--mux: client connections as streams of one channel to a remote agent (agent.py), driven by lane.py."""
