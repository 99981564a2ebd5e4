"""Growing the rack, caching activations, and training: one stack, or the whole model end to end."""
