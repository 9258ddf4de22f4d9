"""Reports of a shard: the terminal summary and the self-contained HTML page."""
