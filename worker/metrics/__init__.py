"""Task metrics the evaluate pass computes on model outputs (pure numpy, no runtime imports)."""
