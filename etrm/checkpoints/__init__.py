"""Reading checkpoints that this trainer did not write (upstream TRM's) beside our own."""
