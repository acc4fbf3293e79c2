"""BYOL-A augmentations on batches of normalised log-mel spectrograms.

Every module takes ``x`` of shape ``(B, 1, F, T)`` (F mel bins, T frames; already
normalised with data-set statistics) and returns a tensor of the same shape, dtype and
device. Work is vectorised over the batch on the batch's device; only the per-example random
parameters (a few numbers per example) are drawn in Python-free torch calls on the CPU, from
``generator`` when given, else from torch's global RNG. Drawing them on the CPU makes a
seeded run augment identically on CPU and GPU.

Reference: Niizumi et al., "BYOL for Audio" (2021), whose augmentation module is
mixup with past examples -> random resize crop -> batch normalisation ("post-norm").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BYOLAAugment", "MixupWithPastBatches", "RandomResizeCrop", "normalize_batch"]


def _check_batch(x: Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected log-mel batch of shape (B, 1, F, T), got {tuple(x.shape)}")


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must have two values, got {value!r}")
    return pair  # type: ignore[return-value]


def _uniform(low: float, high: float, n: int, generator: torch.Generator | None) -> Tensor:
    """(n,) float64 CPU samples of U(low, high)."""
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


class MixupWithPastBatches(nn.Module):
    """BYOL-A "log-mixup-exp" with a FIFO memory of past examples.

    Each example ``x_i`` is mixed with one example ``m`` drawn uniformly from the memory:
    ``log((1 - l) exp(x_i) + l exp(m))`` with ``l ~ U(0, ratio)`` per example (mixing in the
    linear power domain, as sounds add). The memory then receives the current batch
    (detached), oldest entries dropped beyond ``memory_size``. With an empty memory the
    output equals the input.

    The memory is updated only in training mode, so validation batches never leak into the
    training mix; in eval mode the (frozen) memory is still used. It is a plain tensor
    attribute, not a buffer, so DDP never broadcasts it and every rank keeps its own past
    examples; its filled rows are saved in checkpoints as the module's extra state, so a
    resumed run mixes exactly what an uninterrupted one would. It follows the batch's
    device. A batch whose (F, T) differs from the memory's restarts the memory.

    Shapes: x (B, 1, F, T) -> (B, 1, F, T).
    """

    memory: Tensor | None

    def __init__(self, ratio: float = 0.4, memory_size: int = 2048) -> None:
        super().__init__()
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        if memory_size < 1:
            raise ValueError(f"memory_size must be >= 1, got {memory_size}")
        self.ratio = float(ratio)
        self.memory_size = int(memory_size)
        self.memory = None  # (memory_size, F, T) once used
        self._filled = 0  # valid rows of the memory
        self._next = 0  # ring-buffer write position

    def __len__(self) -> int:
        return self._filled

    def reset(self) -> None:
        """Empty the memory."""
        self.memory, self._filled, self._next = None, 0, 0

    def get_extra_state(self) -> dict[str, Any]:
        filled = None if self.memory is None else self.memory[: self._filled].cpu()
        return {"memory": filled, "next": self._next, "size": self.memory_size}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.reset()
        if state.get("memory") is not None and state.get("size") == self.memory_size:
            rows = state["memory"]
            self.memory = rows.new_zeros((self.memory_size, *rows.shape[1:]))
            self.memory[: len(rows)] = rows
            self._filled, self._next = len(rows), int(state["next"])

    @torch.no_grad()
    def _push(self, x: Tensor) -> None:
        """Append ``x`` (B, F, T) to the FIFO memory."""
        if self.memory is None or self.memory.shape[1:] != x.shape[1:]:
            self.memory = x.new_zeros((self.memory_size, *x.shape[1:]))  # rows >= _filled unused
            self._filled = self._next = 0
        x = x[-self.memory_size :]  # a batch larger than the memory keeps its newest rows
        rows = (self._next + torch.arange(x.shape[0])) % self.memory_size
        self.memory[rows.to(x.device)] = x
        self._next = (self._next + x.shape[0]) % self.memory_size
        self._filled = min(self._filled + x.shape[0], self.memory_size)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        b = x.shape[0]
        out = x
        if self.memory is not None and self.memory.device != x.device:
            self.memory = self.memory.to(x.device)
        if self._filled > 0 and self.memory is not None and self.memory.shape[1:] == x.shape[2:]:
            lam = _uniform(0.0, self.ratio, b, generator).to(x.dtype).to(x.device).view(b, 1, 1, 1)
            picks = torch.randint(self._filled, (b,), generator=generator).to(x.device)
            past = self.memory[picks].unsqueeze(1).to(x.dtype)
            # log((1-l) e^x + l e^m) as a logaddexp: no overflow, and l = 0 gives x exactly.
            out = torch.logaddexp(torch.log1p(-lam) + x, torch.log(lam) + past)
        if self.training:
            self._push(x.detach().squeeze(1))
        return out

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, memory_size={self.memory_size}"


class RandomResizeCrop(nn.Module):
    """BYOL-A random resize crop, one random crop per example.

    The (F, T) input sits centred on a zero "virtual canvas" of size
    ``(int(F * virtual_crop_scale[0]), int(T * virtual_crop_scale[1]))``; a crop of size
    ``h = clip(int(F * U(freq_scale)), 1, canvas_F)`` by ``w = clip(int(T * U(time_scale)),
    1, canvas_T)`` is taken at a uniform random position on the canvas and resized back to
    (F, T) (``align_corners=True``, as BYOL-A's ``F.interpolate``). Note
    ``virtual_crop_scale`` is a (freq, time) pair of canvas factors, not a range: BYOL-A's
    (1.0, 1.5) widens the canvas in time only. Zero on the canvas is the data-set mean level
    of normalised log-mel.

    The whole batch is one ``grid_sample`` with a per-example affine grid; sampling outside
    the input reads zeros, exactly what the canvas holds there. BYOL-A resizes bicubically;
    ``mode`` defaults to bilinear (no overshoot ringing, cheaper) and accepts ``"bicubic"``.

    Shapes: x (B, 1, F, T) -> (B, 1, F, T).
    """

    def __init__(
        self,
        virtual_crop_scale: Sequence[float] = (1.0, 1.5),
        freq_scale: Sequence[float] = (0.6, 1.5),
        time_scale: Sequence[float] = (0.6, 1.5),
        mode: str = "bilinear",
    ) -> None:
        super().__init__()
        self.virtual_crop_scale = _pair(virtual_crop_scale, "virtual_crop_scale")
        self.freq_scale = _pair(freq_scale, "freq_scale")
        self.time_scale = _pair(time_scale, "time_scale")
        if min(self.virtual_crop_scale) < 1.0:
            raise ValueError(f"virtual_crop_scale must be >= 1, got {self.virtual_crop_scale}")
        for name, (low, high) in (("freq_scale", self.freq_scale), ("time_scale", self.time_scale)):
            if not 0.0 < low <= high:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(low, high)}")
        if mode not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"mode must be bilinear, bicubic or nearest, got {mode!r}")
        self.mode = mode

    def sample_crops(
        self, batch: int, size: tuple[int, int], generator: torch.Generator | None = None
    ) -> Tensor:
        """Random crops as (batch, 4) float64 CPU rows ``(i, j, h, w)`` in canvas pixels:
        top row, left column, height, width. The input's top-left corner sits at
        ``((canvas_F - F) // 2, (canvas_T - T) // 2)`` on the canvas."""
        f, t = size
        canvas_f = int(f * self.virtual_crop_scale[0])
        canvas_t = int(t * self.virtual_crop_scale[1])
        h = (_uniform(*self.freq_scale, batch, generator) * f).floor().clamp(1, canvas_f)
        w = (_uniform(*self.time_scale, batch, generator) * t).floor().clamp(1, canvas_t)
        # Uniform integer positions in [0, canvas - size], as random.randint in BYOL-A.
        i = (
            torch.rand(batch, generator=generator, dtype=torch.float64) * (canvas_f - h + 1)
        ).floor()
        j = (
            torch.rand(batch, generator=generator, dtype=torch.float64) * (canvas_t - w + 1)
        ).floor()
        return torch.stack([i, j, h, w], dim=1)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        b, _, f, t = x.shape
        i, j, h, w = self.sample_crops(b, (f, t), generator).unbind(1)
        y0 = (int(f * self.virtual_crop_scale[0]) - f) // 2
        x0 = (int(t * self.virtual_crop_scale[1]) - t) // 2
        # align_corners=True: output pixel r reads input row (i - y0) + r (h - 1) / (F - 1);
        # in normalised [-1, 1] coordinates that is v = scale * u + offset.
        sy = (h - 1) / max(f - 1, 1)
        sx = (w - 1) / max(t - 1, 1)
        oy = -1 + 2 * (i - y0) / max(f - 1, 1) + sy
        ox = -1 + 2 * (j - x0) / max(t - 1, 1) + sx
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 2] = sx, ox  # grid x = time (width)
        theta[:, 1, 1], theta[:, 1, 2] = sy, oy  # grid y = frequency (height)
        theta = theta.to(x.dtype).to(x.device)  # cast on the CPU: not every device has float64
        grid = F.affine_grid(theta, [b, 1, f, t], align_corners=True)
        return F.grid_sample(x, grid, mode=self.mode, padding_mode="zeros", align_corners=True)

    def extra_repr(self) -> str:
        return (
            f"virtual_crop_scale={self.virtual_crop_scale}, freq_scale={self.freq_scale}, "
            f"time_scale={self.time_scale}, mode={self.mode!r}"
        )


def normalize_batch(x: Tensor, eps: float | None = None) -> Tensor:
    """BYOL-A post-norm: standardise with the mean and std over the whole batch
    (dims 0, 2, 3; per channel). Shapes: (B, C, F, T) -> (B, C, F, T)."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(eps)
    return (x - mean) / std


class BYOLAAugment(nn.Module):
    """BYOL-A's augmentation module: mixup with past examples, random resize crop, post-norm.

    ``forward(x)`` returns one random view; call it twice for two views. Both calls put the
    batch into the mixup memory, as BYOL-A (which applies its augmentation twice per clip)
    does. Runs in float32 with autocast disabled: ``exp``/``log`` mixing and the resampling
    are not worth doing in half precision.

    Args:
        mixup_ratio: upper bound of the mixing weight of the past example.
        memory_size: number of past examples remembered for mixup.
        virtual_crop_scale: (freq, time) canvas factors of :class:`RandomResizeCrop`.
        freq_scale, time_scale: ranges of the crop size relative to the input size.
        mode: resize interpolation of the crop.

    Shapes: x (B, 1, F, T) -> (B, 1, F, T), float32.
    """

    def __init__(
        self,
        mixup_ratio: float = 0.4,
        memory_size: int = 2048,
        virtual_crop_scale: Sequence[float] = (1.0, 1.5),
        freq_scale: Sequence[float] = (0.6, 1.5),
        time_scale: Sequence[float] = (0.6, 1.5),
        mode: str = "bilinear",
    ) -> None:
        super().__init__()
        self.mixup = MixupWithPastBatches(mixup_ratio, memory_size)
        self.crop = RandomResizeCrop(virtual_crop_scale, freq_scale, time_scale, mode)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        with torch.autocast(x.device.type, enabled=False):
            x = x.detach().float()
            x = self.mixup(x, generator)
            x = self.crop(x, generator)
            return normalize_batch(x)
