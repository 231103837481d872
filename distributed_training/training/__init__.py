"""training layer of distributed-training."""
