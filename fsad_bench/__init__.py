"""fsad-bench: a benchmark harness for few-shot anomaly detection.

Layers, each knowing only the one below it:
data (datasets, k-shot sampler) -> protocols (which images reach ``fit``) ->
engine (cells of a suite) -> method adapters (fit / adapt / predict) ->
result store (one record per cell) -> reporter (pandas tables).
"""

__version__ = "0.1.0"
