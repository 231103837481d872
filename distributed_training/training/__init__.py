"""Training: one Trainer interface, its two modes (gradient averaging and DiLoCo), the model, checkpoints."""
