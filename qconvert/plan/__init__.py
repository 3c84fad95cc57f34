"""Planning a conversion from headers alone: recipes and rules, which tensors are quantized,
which grid each tensor gets, size budgets, and the resources a run will need."""
