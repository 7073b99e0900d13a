"""The data layer: dataset readers per layout, image decoding and its cache, integrity checks, torch
datasets, the synthetic dataset, k-shot sampling (see docs/architecture.md, Files).
"""
