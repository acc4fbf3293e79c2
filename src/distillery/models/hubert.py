"""torchaudio's HuBERT Base as a distillery encoder: the ``hubert_base`` preset of
:class:`~distillery.models.speech.SpeechEncoder`, under the name configs and artifacts use."""

from __future__ import annotations

from distillery.models.speech import SpeechEncoder

__all__ = ["HuBERTEncoder"]


class HuBERTEncoder(SpeechEncoder):
    """``torchaudio.models.hubert_base()`` (94.4M parameters), random weights; see
    :class:`SpeechEncoder` for the interface, other families and sizes, and weights files."""

    def __init__(
        self, encoder_projection_dropout: float = 0.1, encoder_dropout: float = 0.1
    ) -> None:
        super().__init__(
            arch="hubert_base",
            architecture={
                "encoder_projection_dropout": encoder_projection_dropout,
                "encoder_dropout": encoder_dropout,
            },
        )
