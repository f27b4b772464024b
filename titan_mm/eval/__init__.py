"""The evaluation harness: task files (tasks.py), answer metrics (metrics.py), the data-parallel
runner with its results table and JSON (harness.py). Scoring documents by likelihood and loading
weights live in titan_mm/evaluate.py."""
