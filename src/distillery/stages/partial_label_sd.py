"""Stage ``partial_label_sd``: self-distillation rounds vs one partial-label round, as linear
probes of a frozen encoder trained on noisy labels."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from distillery.artifact_kinds import EncoderArtifact, Tensors
from distillery.data.label_noise import add_label_noise, resolve_clusters
from distillery.eval.embed import embed
from distillery.eval.metrics import _at_most_threads
from distillery.losses.partial_label import candidate_gce_loss, soft_cross_entropy, top_k_candidates
from distillery.stages.base import StageModule

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class PartialLabelSDStage(StageModule):
    """Linear (no bias) softmax heads on frozen features, trained on noisy labels.

    Features of the ``pretrained`` encoder (an earlier stage's encoder artifact) are computed once
    per stage, on centre crops of the train, val and test clips, and standardised with the
    train statistics. The train labels (and, with ``noisy_val``, the val labels) get
    ``noise_kind`` noise at ``noise_rate``. Then, on the cached features:

    - ``ce``: round 0, the teacher, trained with CE on the noisy labels;
    - ``sd1`` .. ``sd<rounds>``: multi-round self-distillation, each a fresh head trained
      with CE to ``softmax`` of the previous round's head (T = 1);
    - ``pll``: one partial-label round: the candidate set is the teacher's top-2 classes
      (two-hot target, 1/2 each). ``pll_loss=gce`` (default, as the reference code) is the
      generalised CE over the candidates, ``mean (1 - p_c^q) / q``; ``two_hot_ce`` is CE
      to the two-hot target. Both are minimised by p = 1/2 on each candidate, but CE pulls
      every item all the way to that tie, so a linear student that can nearly fit each
      item ends up choosing between its two candidates almost at random; GCE's gradient
      on a candidate scales with ``p_c^q``, so from the teacher's weights
      (``pll_init=teacher``, as the reference; ``fresh`` starts a new head) it mostly keeps
      the teacher's preference where the teacher is confident. In our runs GCE has the
      higher *validation* accuracy (experiments/pll/README.md).

    Each head trains for ``epochs`` epochs with the ``optimizer`` / per-epoch ``scheduler``
    (SGD, momentum 0.9, lr x 0.98 per epoch by default) and keeps the epoch with the best
    accuracy on the validation split (never the test split). The rounds run in
    ``on_train_start``: the data module's batches are not needed, every step is on the
    cached tensors. Test accuracy of every head (and the teacher's top-2 accuracy) comes
    from ``test_step`` on the cached test features. Under DDP every rank caches the same
    features and trains the same heads (seeded); the test metrics are synced over ranks.
    """

    produces = {"heads": Tensors}

    def __init__(
        self,
        pretrained: EncoderArtifact,
        num_classes: int,
        stage_name: str = "partial_label_sd",
        noise_kind: Literal["symmetric", "asymmetric", "clustered"] = "symmetric",
        noise_rate: float = 0.0,
        noise_clusters: list[list[Any]] | None = None,
        noisy_val: bool = True,
        seed: int = 0,
        rounds: int = 4,
        epochs: int = 200,
        batch_size: int = 128,
        pll_loss: Literal["gce", "two_hot_ce"] = "gce",
        gce_q: float = 0.7,
        pll_init: Literal["teacher", "fresh"] = "teacher",
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(stage_name, optimizer, scheduler)
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        if pll_loss not in ("two_hot_ce", "gce"):
            raise ValueError(f"pll_loss must be 'two_hot_ce' or 'gce', got {pll_loss!r}")
        if pll_init not in ("teacher", "fresh"):
            raise ValueError(f"pll_init must be 'teacher' or 'fresh', got {pll_init!r}")
        self.save_hyperparameters(ignore=["pretrained"])
        self.automatic_optimization = False  # each head has its own optimizer, built per round
        self.pretrained = pretrained
        self.num_classes = num_classes
        self.noise = {"kind": noise_kind, "rate": float(noise_rate), "clusters": noise_clusters}
        self.noisy_val = noisy_val
        self.seed = seed
        self.epochs, self.batch_size = epochs, batch_size
        self.pll_loss, self.gce_q, self.pll_init = pll_loss, gce_q, pll_init
        self.head_names = ["ce", *(f"sd{r}" for r in range(1, rounds + 1)), "pll"]
        # Built here (not per round) so that checkpoints and DDP see them; re-initialised
        # from a seed at the start of each round.
        embed_dim = pretrained.module.embed_dim
        self.heads = nn.ModuleDict(
            {n: nn.Linear(embed_dim, num_classes, bias=False) for n in self.head_names}
        )
        self.register_buffer("trained", torch.tensor(False))
        self.summary: dict[str, float] = {}
        self.test_acc = nn.ModuleDict(
            {name: MulticlassAccuracy(num_classes, average="micro") for name in self.head_names}
        )
        self.test_teacher_top2 = MulticlassAccuracy(
            num_classes, top_k=min(2, num_classes), average="micro"
        )
        # split -> (standardised features, clean labels, noisy labels), filled once per stage
        self._cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._row_of: Tensor | None = None  # data-set index -> row of its split's cache
        self.feature_stats: dict[str, Tensor] = {}  # train mean and std of the raw features

    # -- features -------------------------------------------------------------------------
    def _ensure_features(self) -> None:
        if self._cache:
            return
        datamodule = self.trainer.datamodule
        encoder = self.pretrained.module.to(self.device)
        n_records = len(datamodule.table.source.records)
        row_of = torch.full((n_records,), -1, dtype=torch.long)
        raw = {}
        for split in SPLITS:
            indices, x, labels = embed(
                encoder, datamodule.dataloader(split), datamodule.featurize, self.device
            )
            keep = labels >= 0  # unlabeled train items (label_fraction < 1) cannot be probed
            indices, x, labels = indices[keep], x[keep], labels[keep]
            row_of[torch.from_numpy(indices)] = torch.arange(len(indices))
            raw[split] = (torch.from_numpy(x), torch.from_numpy(labels))
        mean, std = raw["train"][0].mean(0), raw["train"][0].std(0).clamp(min=1e-6)
        for offset, split in enumerate(SPLITS):
            x, labels = raw[split]
            noisy = labels.clone()
            if split == "train" or (split == "val" and self.noisy_val):
                noisy = torch.from_numpy(self._add_noise(labels.numpy(), self.seed + offset))
            self._cache[split] = (
                ((x - mean) / std).to(self.device),
                labels.to(self.device),
                noisy.to(self.device),
            )
        self._row_of = row_of.to(self.device)
        self.feature_stats = {"mean": mean, "std": std}

    def _add_noise(self, labels: np.ndarray, seed: int) -> np.ndarray:
        clusters = self.noise["clusters"]
        if clusters is not None:
            clusters = resolve_clusters(clusters, self.trainer.datamodule.class_names)
        noisy = add_label_noise(
            labels, self.noise["kind"], self.noise["rate"], self.num_classes, seed, clusters
        )
        self.summary.setdefault("noise_realised_rate", noisy.realised_rate)  # train split first
        return noisy.labels

    def on_fit_start(self) -> None:
        self._ensure_features()

    def on_test_start(self) -> None:
        self._ensure_features()

    # -- training -------------------------------------------------------------------------
    def _reset_head(self, position: int) -> nn.Linear:
        """The head of round ``position``, freshly initialised from a seed."""
        head = self.heads[self.head_names[position]]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1000 + position)
            head.reset_parameters()
        return head

    def _fit_head(
        self,
        head: nn.Linear,
        position: int,
        targets: Tensor,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        """Train ``head`` on the cached train features; keep its best validation epoch."""
        x = self._cache["train"][0]
        val_x, _, val_y = self._cache["val"]
        optimizer = instantiate(self.optimizer_cfg)(head.parameters())
        scheduler = instantiate(self.scheduler_cfg)(optimizer) if self.scheduler_cfg else None
        generator = torch.Generator().manual_seed(self.seed * 1000 + position)
        best_acc, best_epoch, best_state = -1.0, -1, None
        for epoch in range(self.epochs):
            order = torch.randperm(len(x), generator=generator).to(self.device)
            for start in range(0, len(x), self.batch_size):
                batch = order[start : start + self.batch_size]
                loss = loss_fn(head(x[batch]), targets[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            with torch.no_grad():
                acc = (head(val_x).argmax(1) == val_y).float().mean().item()
            if acc > best_acc:
                best_acc, best_epoch, best_state = acc, epoch, copy.deepcopy(head.state_dict())
        head.load_state_dict(best_state)
        name = self.head_names[position]
        self.summary[f"val_acc_{name}"] = best_acc
        self.summary[f"best_epoch_{name}"] = float(best_epoch)

    @torch.no_grad()
    def _logits(self, head: nn.Module, split: str) -> Tensor:
        return head(self._cache[split][0])

    def _train_rounds(self) -> None:
        _, clean, noisy = self._cache["train"]
        # Tiny matmuls: threads only add waiting on a busy CPU (10x slower with 2 threads).
        with _at_most_threads(1), torch.enable_grad(), torch.inference_mode(False):
            teacher = self._reset_head(0)
            self._fit_head(teacher, 0, noisy, F.cross_entropy)
            previous = teacher
            for position in range(1, len(self.head_names) - 1):
                soft = F.softmax(self._logits(previous, "train"), dim=1)
                previous = self._reset_head(position)
                self._fit_head(previous, position, soft, soft_cross_entropy)
            position = len(self.head_names) - 1
            candidates = top_k_candidates(self._logits(teacher, "train"), k=2)
            pll = self._reset_head(position)
            if self.pll_init == "teacher":
                pll.load_state_dict(teacher.state_dict())
            loss_fn = soft_cross_entropy if self.pll_loss == "two_hot_ce" else self._gce
            self._fit_head(pll, position, candidates, loss_fn)
        teacher_logits = self._logits(teacher, "train")
        top2 = teacher_logits.topk(min(2, self.num_classes), dim=1).indices
        self.summary["teacher_top1_clean"] = (top2[:, 0] == clean).float().mean().item()
        self.summary["teacher_top2_clean"] = (top2 == clean[:, None]).any(1).float().mean().item()
        self.summary["noisy_label_acc"] = (noisy == clean).float().mean().item()
        self.trained.fill_(True)

    def _gce(self, logits: Tensor, candidates: Tensor) -> Tensor:
        return candidate_gce_loss(logits, candidates, self.gce_q)

    def on_train_start(self) -> None:
        if not self.trained:
            self._train_rounds()
            log.info("%s: %s", self.stage_name, {k: round(v, 4) for k, v in self.summary.items()})
        # Selection results live in the val namespace, noise and teacher facts in train.
        val = {k: v for k, v in self.summary.items() if k.startswith(("val_acc_", "best_epoch_"))}
        self.log_split("val", {k.removeprefix("val_"): v for k, v in val.items()}, sync_dist=False)
        self.log_split(
            "train", {k: v for k, v in self.summary.items() if k not in val}, sync_dist=False
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        return None  # the rounds ran in on_train_start, on the cached features

    def configure_optimizers(self) -> None:
        return None  # one optimizer per head, built from ``optimizer`` in each round

    # -- test -----------------------------------------------------------------------------
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        rows = self._row_of[batch["index"]]
        rows = rows[rows >= 0]
        x, labels, _ = self._cache["test"]
        x, labels = x[rows], labels[rows]
        for name in self.head_names:
            self.test_acc[name](self.heads[name](x), labels)
        self.test_teacher_top2(self.heads["ce"](x), labels)
        self.log_split(
            "test", {f"acc_{n}": self.test_acc[n] for n in self.head_names}, on_epoch=True
        )
        self.log_split("test", {"teacher_top2_acc": self.test_teacher_top2}, on_epoch=True)

    # -- checkpoints and artifacts --------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["partial_label_sd_summary"] = dict(self.summary)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.summary = dict(checkpoint.get("partial_label_sd_summary", {}))

    def export_artifacts(self) -> dict[str, Tensors]:
        _, _, noisy = self._cache["train"]
        heads = {
            n: {k: v.cpu() for k, v in self.heads[n].state_dict().items()} for n in self.head_names
        }
        return {
            "heads": Tensors(
                {
                    "heads": heads,
                    "feature_mean": self.feature_stats["mean"],
                    "feature_std": self.feature_stats["std"],
                    "noisy_train_labels": noisy.cpu(),
                    "summary": dict(self.summary),
                }
            )
        }
