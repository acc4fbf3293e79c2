"""Seeded label noise: symmetric, asymmetric (to the next class) and within clusters of
similar classes.

Every generator corrupts an exact share of each class: ``round(rate * n_c)`` of the
``n_c`` items labeled ``c`` get a different label, chosen by the noise model. The realised
rate (share of labeled items whose label changed) is therefore the requested rate up to
rounding, except where the model cannot move a label (a class alone in its cluster), and it
is always reported. Unlabeled items (``-1``) are left as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["NOISE_KINDS", "NoisyLabels", "add_label_noise", "resolve_clusters"]

NOISE_KINDS = ("symmetric", "asymmetric", "clustered")


@dataclass(frozen=True)
class NoisyLabels:
    """Noisy labels (n,) int64 and how noisy they really are."""

    labels: np.ndarray
    kind: str
    rate: float  # requested
    realised_rate: float  # share of labeled items whose label changed


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def resolve_clusters(
    clusters: Sequence[Sequence[int | str]], class_names: Sequence[str]
) -> list[list[int]]:
    """Clusters given by class index or class name -> lists of class indices.

    Raises ``ValueError`` naming the unknown class or a class listed in two clusters.
    """
    index = {name: i for i, name in enumerate(class_names)}
    resolved, seen = [], set()
    for cluster in clusters:
        members = []
        for c in cluster:
            if isinstance(c, str):
                if c not in index:
                    raise ValueError(
                        f"noise cluster {list(cluster)}: unknown class {c!r} (classes: {list(class_names)})"
                    )
                c = index[c]
            if not 0 <= int(c) < len(class_names):
                raise ValueError(
                    f"noise cluster {list(cluster)}: class index {c} outside [0, {len(class_names)})"
                )
            if int(c) in seen:
                raise ValueError(
                    f"noise clusters: class {class_names[int(c)]!r} is in more than one cluster"
                )
            seen.add(int(c))
            members.append(int(c))
        resolved.append(members)
    return resolved


def add_label_noise(
    labels: np.ndarray,
    kind: str,
    rate: float,
    num_classes: int,
    seed: int,
    clusters: Sequence[Sequence[int]] | None = None,
) -> NoisyLabels:
    """Corrupt ``round(rate * n_c)`` labels of every class ``c``.

    - ``symmetric``: the new label is uniform over the other ``num_classes - 1`` classes;
    - ``asymmetric``: the new label is ``(c + 1) % num_classes``;
    - ``clustered``: the new label is uniform over the other classes of ``c``'s cluster
      (``clusters``: lists of class indices); classes in no cluster, or alone in one, keep
      their labels, so the realised rate can be lower than ``rate``.

    Args:
        labels: (n,) int labels, ``-1`` for unlabeled items.
        rate: share of each class to corrupt, in [0, 1).
        seed: the result is a pure function of the arguments.

    Returns:
        :class:`NoisyLabels` with the (n,) int64 noisy labels and the realised rate.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {list(NOISE_KINDS)}, got {kind!r}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    labels = np.asarray(labels).astype(np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be (n,), got shape {labels.shape}")
    if (labels >= num_classes).any():
        raise ValueError(f"labels must be < num_classes={num_classes}, got {labels.max()}")
    if kind != "clustered" and num_classes < 2:
        raise ValueError("label noise needs at least 2 classes")
    cluster_of: dict[int, list[int]] = {}
    if kind == "clustered":
        if clusters is None:
            raise ValueError("clustered noise needs clusters (lists of similar classes)")
        for cluster in clusters:
            for c in cluster:
                cluster_of[int(c)] = [int(o) for o in cluster if int(o) != int(c)]

    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    for c in range(num_classes):  # fixed order: the rng is consumed reproducibly
        members = np.flatnonzero(labels == c)
        count = _round_half_up(rate * len(members))
        if count == 0:
            continue
        flipped = rng.choice(members, size=count, replace=False)
        if kind == "symmetric":
            # An offset in 1..C-1 lands uniformly on one of the other classes.
            noisy[flipped] = (c + rng.integers(1, num_classes, size=count)) % num_classes
        elif kind == "asymmetric":
            noisy[flipped] = (c + 1) % num_classes
        elif others := cluster_of.get(c):
            noisy[flipped] = rng.choice(others, size=count)
    labeled = labels >= 0
    realised = float((noisy[labeled] != labels[labeled]).mean()) if labeled.any() else 0.0
    return NoisyLabels(noisy, kind, float(rate), realised)
