"""Observability: counts kept by the actors (``tally``), their Prometheus export
(``metrics``: each actor's snapshot; ``endpoint``: one scrape for the whole bus),
OpenTelemetry trace context (``trace``) and JSON logs (``qntx.log``).

Nothing here imports prometheus-client or OpenTelemetry until it is used: an actor
of a bus whose metrics are off, or a process without the ``otel`` extra, pays nothing.
"""
