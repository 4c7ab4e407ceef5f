"""Observability: what workers count (tally.py, no Prometheus import: it is
in every worker), what the master accumulates from their reports
(counters.py), and the Prometheus exposition with /healthz (metrics.py,
http.py; prometheus_client is imported only when metrics are asked for)."""
