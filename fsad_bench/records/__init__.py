"""Records: one JSON file per cell (atomic, resumable), example maps, the optional MLflow sink."""
