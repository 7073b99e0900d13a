"""Example fsad-bench method package (docs/adding-a-method.md): the ``knn`` adapter in :mod:`fsad_knn.knn`."""
