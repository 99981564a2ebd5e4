"""Validation loss, perplexity and the per-stack readout."""
