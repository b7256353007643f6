"""Statistics beyond one mini-batch: population (Algorithm 2) and cross-process."""
