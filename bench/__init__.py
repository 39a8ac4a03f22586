"""Benchmarks of hrflow-webhooks (issue 7): ``python -m bench`` runs every row.

Every figure is a ratio to a baseline measured in the same run, on the same
machine, with real processes on loopback: the machines are shared and noisy.
"""
