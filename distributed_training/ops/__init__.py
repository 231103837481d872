"""Operator tools: dt-dht, dt-monitor, dt-check-compute, and the optional wandb sink."""
