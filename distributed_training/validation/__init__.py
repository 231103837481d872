"""validation layer of distributed-training."""
