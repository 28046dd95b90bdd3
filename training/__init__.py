"""Training: one loop over five model families (see ``training.registry``)."""
