"""The training loop and its parts: schedule, EMA, checkpoints, evaluation, console, run directories."""
