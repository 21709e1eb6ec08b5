"""Training: the generic loop (trainer.py), checkpoints, EMA, configs, and one module per method."""
