"""The ACT property suite: carry/label invariants driven by a Hypothesis state machine over any adapted model."""
