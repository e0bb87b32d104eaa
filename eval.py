"""Scoring and metrics (work in progress: see the eval issue)."""
import torch


def rating_logits(model, batch, rating_ids):
    """The logits of the five rating tokens at each example's decision position: (B, 5), fp32.
    One forward pass; the LM head runs at the decision position only."""
    logits = model(batch["input_ids"], logits_at=batch["decision_pos"])       # (B, V)
    return logits.float()[:, torch.as_tensor(rating_ids, device=logits.device)]
