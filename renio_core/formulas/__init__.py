"""Pure formulas: losses, ReNIO weights, evaluation metrics (arrays and tensors in, numbers out)."""
