"""Measurements: a stack's training step against end-to-end training of the same model."""
