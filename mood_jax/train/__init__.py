"""The training engine: the loop, a stage's description, optimizers, checkpoints, the metrics
log and progress, evaluation during training, and the check of changed settings."""
