"""Prometheus metrics for running jobs (implements the trainer's metrics-sink interface)."""
