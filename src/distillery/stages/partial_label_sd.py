"""Stage ``partial_label_sd``: self-distillation rounds vs one partial-label round, as linear
probes of a frozen encoder trained on noisy labels."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.classification import MulticlassAccuracy

from distillery.artifact_kinds import EncoderArtifact, Tensors
from distillery.data.feature_cache import FeatureCache
from distillery.data.label_noise import add_label_noise, resolve_clusters
from distillery.losses.partial_label import candidate_gce_loss, soft_cross_entropy, top_k_candidates
from distillery.stages.base import StageModule

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class PartialLabelSDStage(StageModule):
    """Linear (no bias) softmax heads on frozen features, trained on noisy labels.

    Features of the ``pretrained`` encoder (an earlier stage's encoder artifact) are computed
    once per stage, on centre crops of the train, val and test clips, and standardised with the
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

    The stage trains on a :class:`~distillery.data.feature_cache.FeatureCache` of those
    features (:meth:`configure_data`), in an ordinary Lightning loop where **one epoch is
    one round**: the trainer runs ``rounds + 2`` epochs (the stage sets it), and round
    ``r``'s epoch holds ``epochs`` shuffled passes over the train features in batches of
    ``batch_size``. Each head has its own ``optimizer`` and per-pass ``scheduler`` (SGD,
    momentum 0.9, lr x 0.98 per pass by default) and keeps the pass with the best accuracy
    on the validation split (never the test split). A checkpoint after each round resumes
    at the next one. Test accuracy of every head (and the teacher's top-2 accuracy) comes
    from ``test_step`` on the cached test features, synced over ranks under DDP.

    Under DDP every rank holds all the features and draws the same batches, so the ranks
    train identical heads without a gradient all-reduce (in which DDP would also reject the
    heads of the other rounds, unused in this one). Each head takes one optimizer step
    per batch: the stage config pins ``accumulate_grad_batches`` to 1.
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
        self.automatic_optimization = False  # one optimizer per head, stepped by hand
        self.pretrained = pretrained
        self.num_classes = num_classes
        self.noise = {"kind": noise_kind, "rate": float(noise_rate), "clusters": noise_clusters}
        self.noisy_val = noisy_val
        self.seed = seed
        self.epochs, self.batch_size = epochs, batch_size
        self.pll_loss, self.gce_q, self.pll_init = pll_loss, gce_q, pll_init
        self.head_names = ["ce", *(f"sd{r}" for r in range(1, rounds + 1)), "pll"]
        self.heads = nn.ModuleDict(
            {
                n: nn.Linear(pretrained.module.embed_dim, num_classes, bias=False)
                for n in self.head_names
            }
        )
        self.summary: dict[str, float] = {}
        self.test_acc = nn.ModuleDict(
            {name: MulticlassAccuracy(num_classes, average="micro") for name in self.head_names}
        )
        self.test_teacher_top2 = MulticlassAccuracy(
            num_classes, top_k=min(2, num_classes), average="micro"
        )
        self.noisy: dict[str, Tensor] = {}  # noisy train (and val) labels, on the device
        self._targets: Tensor | None = None  # the current round's training targets
        self._loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
        self._best: tuple[float, int, dict[str, Tensor] | None] = (-1.0, -1, None)
        self._pass = 0
        self._threads = 0

    # -- data -----------------------------------------------------------------------------
    def configure_data(self, data: pl.LightningDataModule) -> FeatureCache:
        return FeatureCache(
            data,
            self.pretrained.module,
            batch_size=self.batch_size,
            passes=self.epochs,
            seed=self.seed,
        )

    def setup(self, stage: str) -> None:
        if stage == "fit":  # one epoch per round, whatever the trainer config says
            self.trainer.fit_loop.max_epochs = len(self.head_names)

    def _features(self, split: str) -> tuple[Tensor, Tensor]:
        cache = self.trainer.datamodule
        return cache.features[split].to(self.device), cache.labels[split].to(self.device)

    def _add_noise(self) -> None:
        """Seeded noise on the train (and, with ``noisy_val``, val) labels; once per stage."""
        if self.noisy:
            return
        clusters = self.noise["clusters"]
        if clusters is not None:
            clusters = resolve_clusters(clusters, self.trainer.datamodule.class_names)
        for offset, split in enumerate(("train", "val")):
            labels = self._features(split)[1]
            if split == "val" and not self.noisy_val:
                self.noisy[split] = labels
                continue
            noisy = add_label_noise(
                labels.cpu().numpy(),
                self.noise["kind"],
                self.noise["rate"],
                self.num_classes,
                self.seed + offset,
                clusters,
            )
            self.summary.setdefault("noise_realised_rate", noisy.realised_rate)  # train's
            self.noisy[split] = torch.from_numpy(noisy.labels).to(self.device)

    def on_fit_start(self) -> None:
        self._add_noise()

    # -- training: one round per epoch ----------------------------------------------------
    def _reset_head(self, position: int) -> nn.Linear:
        """The head of round ``position``, freshly initialised from a seed."""
        head = self.heads[self.head_names[position]]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1000 + position)
            head.reset_parameters()
        return head

    @torch.no_grad()
    def _logits(self, name: str, split: str) -> Tensor:
        return self.heads[name](self._features(split)[0])

    def on_train_start(self) -> None:
        # Tiny matmuls: threads only add waiting on a busy CPU (10x slower with 2 threads).
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def on_train_end(self) -> None:
        torch.set_num_threads(self._threads)

    def on_train_epoch_start(self) -> None:
        """Start round ``current_epoch``: a fresh head and its targets."""
        position, last = self.current_epoch, len(self.head_names) - 1
        head = self._reset_head(position)
        if position == 0:  # the CE teacher, on the noisy labels
            self._targets, self._loss_fn = self.noisy["train"], F.cross_entropy
        elif position < last:  # self-distillation from the previous round's head
            previous = self.head_names[position - 1]
            self._targets = F.softmax(self._logits(previous, "train"), dim=1)
            self._loss_fn = soft_cross_entropy
        else:  # partial labels: the teacher's top-2 candidates
            self._targets = top_k_candidates(self._logits("ce", "train"), k=2)
            if self.pll_init == "teacher":
                head.load_state_dict(self.heads["ce"].state_dict())
            self._loss_fn = soft_cross_entropy if self.pll_loss == "two_hot_ce" else self._gce
        self._best, self._pass = (-1.0, -1, None), 0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        position = self.current_epoch
        optimizer = self._round_optimizer(position)
        head = self.heads[self.head_names[position]]
        loss = self._loss_fn(head(batch["features"]), self._targets[batch["row"]])
        optimizer.zero_grad(set_to_none=True)
        ddp = self.trainer.strategy.model
        # Ranks replicate the training (see the class docstring): no gradient all-reduce.
        with ddp.no_sync() if isinstance(ddp, DistributedDataParallel) else nullcontext():
            self.manual_backward(loss)
        optimizer.step()
        if (batch_idx + 1) % self.trainer.train_dataloader.batch_sampler.batches_per_pass == 0:
            self._end_pass(position)
        return loss.detach()

    def _round_optimizer(self, position: int) -> Any:
        optimizers = self.optimizers()
        return optimizers[position] if isinstance(optimizers, list) else optimizers

    def _end_pass(self, position: int) -> None:
        """After a pass: step the head's scheduler; keep the head if validation improved."""
        if self.scheduler_cfg:
            schedulers = self.lr_schedulers()
            (schedulers[position] if isinstance(schedulers, list) else schedulers).step()
        name = self.head_names[position]
        with torch.no_grad():
            acc = (self._logits(name, "val").argmax(1) == self.noisy["val"]).float().mean().item()
        if acc > self._best[0]:
            self._best = (acc, self._pass, copy.deepcopy(self.heads[name].state_dict()))
        self._pass += 1

    def on_train_epoch_end(self) -> None:
        """End of a round: keep the head's best validation pass, log the round's results."""
        position = self.current_epoch
        name = self.head_names[position]
        if self._best[2] is None:  # a shortened epoch (e.g. debug=smoke) finished no pass
            self._end_pass(position)
        acc, best_pass, state = self._best
        self.heads[name].load_state_dict(state)
        self.summary[f"val_acc_{name}"], self.summary[f"best_epoch_{name}"] = acc, float(best_pass)
        if position == 0:
            clean = self._features("train")[1]
            top2 = self._logits("ce", "train").topk(min(2, self.num_classes), dim=1).indices
            self.summary["teacher_top1_clean"] = (top2[:, 0] == clean).float().mean().item()
            self.summary["teacher_top2_clean"] = (
                (top2 == clean[:, None]).any(1).float().mean().item()
            )
            self.summary["noisy_label_acc"] = (self.noisy["train"] == clean).float().mean().item()
        if position == len(self.head_names) - 1:
            log.info("%s: %s", self.stage_name, {k: round(v, 4) for k, v in self.summary.items()})
        # Selection results live in the val namespace, noise and teacher facts in train.
        val = {k: v for k, v in self.summary.items() if k.startswith(("val_acc_", "best_epoch_"))}
        self.log_split("val", {k.removeprefix("val_"): v for k, v in val.items()}, sync_dist=False)
        self.log_split(
            "train", {k: v for k, v in self.summary.items() if k not in val}, sync_dist=False
        )

    def _gce(self, logits: Tensor, candidates: Tensor) -> Tensor:
        return candidate_gce_loss(logits, candidates, self.gce_q)

    def configure_optimizers(self) -> Any:
        optimizers = [
            instantiate(self.optimizer_cfg)(self.heads[n].parameters()) for n in self.head_names
        ]
        if not self.scheduler_cfg:
            return optimizers
        return optimizers, [instantiate(self.scheduler_cfg)(o) for o in optimizers]

    # -- test -----------------------------------------------------------------------------
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x, labels = batch["features"], batch["label"]
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
        cache = self.trainer.datamodule
        heads = {
            n: {k: v.cpu() for k, v in self.heads[n].state_dict().items()} for n in self.head_names
        }
        return {
            "heads": Tensors(
                {
                    "heads": heads,
                    "feature_mean": cache.mean,
                    "feature_std": cache.std,
                    "noisy_train_labels": self.noisy["train"].cpu(),
                    "summary": dict(self.summary),
                }
            )
        }
