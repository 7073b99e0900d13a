"""Running a suite: plan (cells, config hashes), seeds, timing, streamed prediction, the model cache,
scheduling on local processes or Dask.
"""
