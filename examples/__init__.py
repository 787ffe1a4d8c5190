"""Real workloads written against the public task API (:mod:`trainer.api`), one package each."""
