"""A user's distillation loss: 1 - cosine between student and teacher embeddings."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cosine_distance(student: Tensor, teacher: Tensor, scale: float = 1.0) -> Tensor:
    """Mean of ``scale * (1 - cos(s_i, t_i))`` over the batch; (B, D) inputs."""
    return scale * (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()
