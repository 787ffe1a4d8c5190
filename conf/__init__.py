"""The Hydra configs, installed as the package ``trainer.conf`` (pyproject.toml maps it onto this directory).

Hydra finds them as ``pkg://trainer.conf``; it needs this file to treat the package as a config source.
"""
