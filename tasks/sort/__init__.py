"""Learning to sort numbers: the training run, its summary, and the sort benchmarks."""
