"""Helpers for testing the trainer and its extensions: config composition, adapter conformance."""
