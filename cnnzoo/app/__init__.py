"""The application run.py runs: tasks, config validation, cross-framework verification, eval,
predict, compare, sweeps."""
