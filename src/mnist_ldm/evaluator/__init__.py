"""The digit classifiers whose features score samples, their training and nearest-neighbour search."""
