"""checkpoint → checkpoint: sparsify (zero weights inside experts) and heal (distil from the original)."""
