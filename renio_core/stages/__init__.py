"""The pipeline's stages, one module each: rollout, score, weight, train, evaluate (renio eval)."""
