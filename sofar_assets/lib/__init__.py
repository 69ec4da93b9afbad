"""Plain Python/torch/numpy building blocks. Nothing in this package imports Dagster."""
