"""Start-up check of the weights files a config names: missing or mismatched files fail
before anything runs, each named with its key path."""

from __future__ import annotations

import inspect
from typing import Any

from hydra.utils import get_object

__all__ = ["check_encoder_weights"]


def _is_speech_encoder(node: Any) -> bool:
    if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
        return False
    try:  # get_object: a function target (e.g. a scheduler) is not an error to log here
        cls = get_object(node["_target_"])
    except Exception:  # noqa: BLE001 - an unimportable target is reported by check_targets
        return False
    if not inspect.isclass(cls):
        return False
    # By name: torchaudio is imported only when a config uses a speech encoder.
    return any(
        (c.__module__, c.__name__) == ("distillery.models.speech", "SpeechEncoder")
        for c in cls.__mro__
    )


def check_encoder_weights(node: Any, path: str) -> list[str]:
    """Problems with the weights files of every speech encoder in a config subtree: its
    ``weights``, and a stage's ``teacher_weights`` next to a speech-encoder ``teacher``
    (interpolations name files produced at run time and are skipped)."""

    def check(file: Any, encoder: dict[str, Any], key: str) -> list[str]:
        if not isinstance(file, str) or file.startswith("${"):
            return []
        from distillery.models.speech_weights import check_weights

        try:
            check_weights(file, encoder.get("arch"), encoder.get("architecture"))
        except ValueError as err:
            return [f"{key}: {err}"]
        return []

    problems: list[str] = []
    if isinstance(node, dict):
        if _is_speech_encoder(node):
            problems += check(node.get("weights"), node, f"{path}.weights")
        if _is_speech_encoder(node.get("teacher")):
            problems += check(
                node.get("teacher_weights"), node["teacher"], f"{path}.teacher_weights"
            )
        for key, value in node.items():
            problems += check_encoder_weights(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            problems += check_encoder_weights(value, f"{path}[{i}]")
    return problems
