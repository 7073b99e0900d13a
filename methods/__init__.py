"""Method adapters, one file or folder each (installed as ``fsad_bench.methods``).

Register a new one with a line in ``fsad_bench/registry.py:BUILTIN`` (and its ``INFO`` line) or, from
another package, the ``fsad_bench.methods`` entry-point group (docs/adding-a-method.md, examples/fsad-knn).
"""
