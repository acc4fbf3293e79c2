"""Loss functions: pure, stateless, one file per family, each returning a scalar tensor."""

from distillery.losses.distill import coss_loss, l1_cosine_distill_loss
from distillery.losses.self_distill import multi_exit_loss
from distillery.losses.ssl import barlow_twins_loss, byol_loss, nt_xent

__all__ = [
    "barlow_twins_loss",
    "byol_loss",
    "coss_loss",
    "l1_cosine_distill_loss",
    "multi_exit_loss",
    "nt_xent",
]
