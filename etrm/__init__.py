"""etrm: a TRM/ETRM trainer instrumented for diagnosing recurrent ACT training."""

__version__ = "0.1.0"
