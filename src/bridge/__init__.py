"""bridge: budget-aware distillation through a teacher assistant."""

__version__ = "0.1.0"
