"""The built-in model. Any ``torch.nn.Module`` mapping token ids (B, T) to logits (B, T, V) can replace it."""

from trainer.model.gpt import GPT

__all__ = ["GPT"]
