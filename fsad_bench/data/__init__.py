"""The data layer: dataset readers, image decoding and its cache, the synthetic dataset, k-shot sampling.
"""
