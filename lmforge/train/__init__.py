"""Training: the one trainer, batches, checkpoints, resume, distribution (FSDP2, AC, compile),
launch, and the skeleton both training stages share."""
