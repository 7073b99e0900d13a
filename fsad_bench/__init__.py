"""fsad-bench: a benchmark harness for few-shot anomaly detection.

Layers, lowest first (each imports only its own layer or lower; docs/architecture.md):
leaves (errors, seeding, identity, metrics) -> components -> data -> method API (adapter,
registry) -> methods -> protocols -> records -> run -> report -> cli.
"""

__version__ = "0.1.0"
