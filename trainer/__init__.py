"""Fault-tolerant PyTorch training across accelerator families.

Entry point: ``python -m trainer <hydra overrides>``; programmatic entry point: :func:`trainer.job.run`.
"""

__version__ = "0.1.0"
