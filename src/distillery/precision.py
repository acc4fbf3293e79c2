"""The precision statistics and losses compute in."""

import torch
from torch import Tensor


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is of lower precision (autocast's bfloat16/float16 outputs, so
    a loss or a statistic is not summed in half precision); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
