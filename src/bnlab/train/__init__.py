"""Training utilities: deterministic batch order, atomic checkpoints, JSON-lines logs."""
