"""Distillation losses: layer-local output matching, hidden-state alignment, logit KL and next-token CE."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; a weight of 0 skips the term (and its cost).

    Layer-local terms (cheap: one layer forward/backward):
      attn   - normalised MSE between the DSLA layer's output and the attention output on the same input;
      hidden - normalised MSE between the hybrid's residual stream after the layer and the all-attention
               teacher's (lets the layer compensate drift from earlier converted layers).
    End-to-end terms (run the rest of the model; only in the ``e2e_steps`` stage):
      kl     - temperature-scaled KL(teacher || student) over next-token distributions, times T²;
      ce     - next-token cross-entropy on the data.
    """

    attn: float = 1.0
    hidden: float = 0.0
    kl: float = 1.0
    ce: float = 0.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        for name, w in asdict(self).items():
            if w < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {w}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def normalized_mse(out: Tensor, target: Tensor, scale: Tensor | float | None = None) -> Tensor:
    """mean((out - target)²) / scale, scale defaulting to mean(target²): 1.0 means 'as bad as outputting 0'."""
    scale = target.float().pow(2).mean() if scale is None else scale
    return (out.float() - target.float()).pow(2).mean() / scale


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(teacher/T) || softmax(student/T)), averaged over positions."""
    V = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, -1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def next_token_nll(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) on input_ids (B, T)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
