"""Where a run lives and what it holds: typed records, checkpoints, stores, the Run, data."""
