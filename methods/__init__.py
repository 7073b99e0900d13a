"""Method adapters, one module or package each (installed as ``fsad_bench.methods``).

Register a new one with a line in ``fsad_bench/registry.py:BUILTIN`` or, from another
package, the ``fsad_bench.methods`` entry-point group.
"""
