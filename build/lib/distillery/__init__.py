"""distillery: multi-stage self-supervised distillation on audio, with PyTorch Lightning."""

__version__ = "0.1.0"
