"""``etrm-eval``: evaluate trained checkpoints (ours, or upstream TRM's) into a fresh run directory, no training."""
