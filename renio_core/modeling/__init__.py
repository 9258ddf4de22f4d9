"""Models: loading, fingerprints, log-prob heads, and the embedded toy worlds."""
