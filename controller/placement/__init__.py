"""Memory-aware placement: which workers hold a model, and the split that says how."""
