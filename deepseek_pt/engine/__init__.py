"""The training engine on DeepSpeed: config generation, balancing, checkpoints, metrics."""
