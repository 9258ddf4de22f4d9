"""The pipeline's stages (rollout, score, weight, train, eval) and the run loop."""
