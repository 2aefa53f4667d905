"""Shared plumbing of the product: config validation, data, run directory, tasks."""
