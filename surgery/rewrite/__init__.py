"""plan → checkpoint: kept experts sliced out of the source shards, config rewritten, MoNE novices."""
