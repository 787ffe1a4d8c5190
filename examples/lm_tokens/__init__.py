"""A language model on real text: nanoGPT-layout token files (``prepare``) and a task reading them (``task``)."""
