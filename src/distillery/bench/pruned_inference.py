"""Inference time of a structurally pruned encoder against its unpruned teacher.

The pruned model is what the DPHuBERT stages export (``build_pruned``): the teacher's
architecture cut to about 25% of its parameters (a quarter of the conv channels, one head
per block, FFN units filling the rest), a plain smaller ``nn.Module``. Both run the same
batch under ``torch.inference_mode``; repeats are interleaved, medians compared.

Models: our ``TransformerEncoder`` recipe teacher (1.97M parameters) on a batch of
1-second log-mel clips; HuBERT, wav2vec 2.0 and WavLM on a 1-second waveform: their Base
architectures (94-95M parameters) in full runs, tiny ones in ``--quick`` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distillery.bench.timing import Comparison, interleaved, median
from distillery.models.encoders import count_parameters
from distillery.models.io import build_encoder
from distillery.models.pruning import build_pruned, pruning_spec

KEEP = 0.25  # fraction of the teacher's parameters the pruned model keeps

TRANSFORMER = {
    "_target_": "distillery.models.encoders.TransformerEncoder",
    "n_mels": 64,
    "dim": 192,
    "depth": 4,
    "heads": 4,
    "ffn_dim": 768,
    "dropout": 0.1,
}
SPEECH_FAMILIES = ("hubert", "wav2vec2", "wavlm")


def speech_config(family: str, quick: bool) -> dict[str, Any]:
    """The family's Base preset, or (quick) a 2-layer, 64-wide version of it."""
    if not quick:
        return {"_target_": "distillery.models.speech.SpeechEncoder", "arch": f"{family}_base"}
    small = {
        "extractor_conv_layer_config": [[64, 10, 5]] + [[64, 3, 2]] * 4 + [[64, 2, 2]] * 2,
        "encoder_embed_dim": 64,
        "encoder_num_layers": 2,
        "encoder_num_heads": 4,
        "encoder_ff_interm_features": 256,
        "encoder_pos_conv_kernel": 16,
        "encoder_pos_conv_groups": 4,
    }
    return {
        "_target_": "distillery.models.speech.SpeechEncoder",
        "arch": f"{family}_base",
        "architecture": small,
    }


def kept_for_fraction(base: dict[str, Any], keep: float) -> dict[str, int]:
    """Unit counts giving about ``keep`` of the parameters: 1/4 of the conv channels, one
    head per block, and the number of FFN units (the same in every block) that fills the
    rest, solved from the linear parameter-count formula."""
    model = build_encoder(base)
    spec = pruning_spec(model)
    groups = spec.groups(model, ("conv", "heads", "ffn"))
    kept = {
        g.name: max(1, g.size // 4) if g.kind == "conv" else 1 for g in groups if g.kind != "ffn"
    }
    ffn = [g for g in groups if g.kind == "ffn"]

    def params(units: float) -> float:
        counts = {name: torch.tensor(float(n)) for name, n in kept.items()}
        counts |= {g.name: torch.tensor(units) for g in ffn}
        return float(spec.param_count(model, counts))

    per_unit = params(1.0) - params(0.0)
    units = (keep * count_parameters(model) - params(0.0)) / per_unit
    kept |= {g.name: int(min(g.size, max(0, round(units)))) for g in ffn}
    return kept


def time_models(
    models: dict[str, nn.Module], x: Tensor, repeats: int, inner: int
) -> dict[str, float]:
    """Median seconds of one forward of ``x`` per model (``inner`` calls per repeat,
    repeats interleaved across the models, one warm-up call each)."""

    def timed(model: nn.Module) -> Any:
        def call() -> None:
            with torch.inference_mode():
                for _ in range(inner):
                    model(x)

        return call

    for model in models.values():  # warm-up: first-call allocations
        timed(model)()
    seconds = interleaved({name: timed(model) for name, model in models.items()}, repeats)
    return {name: median(values) / inner for name, values in seconds.items()}


def _compare(
    name: str, base: dict[str, Any], x: Tensor, repeats: int, inner: int
) -> tuple[dict[str, Any], list[Comparison]]:
    torch.manual_seed(0)
    teacher = build_encoder(base).eval()
    kept = kept_for_fraction(base, KEEP)
    pruned = build_pruned(base, kept).eval()
    seconds = time_models({"teacher": teacher, "pruned": pruned}, x, repeats, inner)
    raw = {
        "input_shape": list(x.shape),
        "teacher_params": count_parameters(teacher),
        "pruned_params": count_parameters(pruned),
        "kept": kept,
        "seconds_per_batch": seconds,
    }
    rows = [
        Comparison(
            benchmark="pruned_inference",
            measure=f"{name} parameters",
            unit="params",
            candidate=f"pruned to {KEEP:.0%}",
            baseline="teacher",
            candidate_value=float(raw["pruned_params"]),
            baseline_value=float(raw["teacher_params"]),
            higher_is_better=False,
        ),
        Comparison(
            benchmark="pruned_inference",
            measure=f"{name} inference time per batch {tuple(x.shape)}",
            unit="s",
            candidate=f"pruned to {KEEP:.0%}",
            baseline="teacher",
            candidate_value=seconds["pruned"],
            baseline_value=seconds["teacher"],
            higher_is_better=False,
            goal=1.0,
        ),
    ]
    return raw, rows


def run(quick: bool, cache_dir: Path) -> tuple[dict[str, Any], list[Comparison]]:
    """Teacher vs pruned export: parameters and inference seconds per batch."""
    repeats, inner = (3, 2) if quick else (7, 5)
    mel = torch.randn(16, 1, 64, 101)  # 16 one-second clips at a 10 ms hop
    raw, rows = {}, []
    raw["transformer"], rows_t = _compare("transformer", TRANSFORMER, mel, repeats, inner)
    rows += rows_t
    for family in SPEECH_FAMILIES:
        name = f"{family}_{'tiny' if quick else 'base'}"
        config = speech_config(family, quick)
        raw[name], rows_s = _compare(name, config, torch.randn(1, 16000), 5, 1)
        rows += rows_s
    return raw, rows
