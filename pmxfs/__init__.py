"""pmxfs: a replicated cluster configuration filesystem."""
