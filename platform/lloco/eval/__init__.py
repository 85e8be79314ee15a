"""Quality evaluation: datasets, baselines, metrics."""
