"""Training: the optimizer (AdamW + the aux-loss-free bias update), the loss, the step and loop."""
