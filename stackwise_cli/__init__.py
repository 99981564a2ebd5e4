"""stackwise: train transformer language models one stack of blocks at a time."""

__version__ = "0.1.0"
