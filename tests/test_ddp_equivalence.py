"""Two processes with half the batch each train exactly what one process with the whole batch
trains: the same per-step loss (averaged over the ranks) and the same final weights.

Every run goes through the Runner as a user's would: the real data module and train
sampler, the per-batch reseeding, checkpoints, the trainer config (``trainer=ddp`` values
on the stage). Why the union of the two ranks' batches is the one-process batch:

- random batches: every rank's ``TrainSampler`` draws the same permutation (seed, epoch) and
  takes every second item of it, so batch ``b`` of rank ``r`` is the items of the one-process
  batch ``b`` at positions ``r, r + 2, ...``; a clip's random crop comes from (seed, epoch,
  clip), not from the rank;
- kNN batches (``coss_kd``): rank ``r`` takes the ``r``-th half of each round's anchors,
  and an anchor's neighbours are drawn from (seed, epoch, its position in the epoch).

DDP averages the ranks' gradients; every loss here is a mean over equally many items per
rank, so that average is the one-process gradient.

The runs use float64 (``precision: 64-true``). In float32 the two runs sum in different
orders and differ by about 1e-7 per step, which training amplifies: Adam turns the float
noise of parameters whose exact gradient is zero (a convolution's bias before BatchNorm,
attention's key bias) into steps of about ``lr``. Measured in float32: per-step losses
within 7e-7, weights within 3e-5 except those biases (8e-3 apart). In float64 every weight
agrees within 3e-10 (those biases; the rest within 1e-13), so the tolerances below leave
no room for a real difference. The losses keep float64 too (they upcast half precision
only), so the loss curves are compared at float64 tolerance.

What the math does not allow, and how the configurations here avoid it (each a setting a
user can choose too):

- dropout draws differ per rank (the per-batch seed includes the rank): ``dropout: 0``;
- BatchNorm normalises with the batch's statistics: with ``sync_batchnorm: true`` (the
  default of ``trainer=ddp``) the statistics are those of the global batch; with per-rank
  statistics (``false``) the forward pass differs, so that policy is only checked for
  equal running statistics on both ranks;
- hard-concrete gates (``prune_distill``) sample their noise per rank by default:
  ``gate_noise: shared`` draws the same masks on every rank, those one process draws.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from tests.helpers import FAST, compose_config, spawn_two_ranks

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

BATCH = 8  # one process; each of the two ranks gets BATCH // 2
DDP = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "sync_batchnorm": True}
TINY_TRANSFORMER = {
    "_target_": "distillery.models.encoders.TransformerEncoder",
    "n_mels": 64,
    "dim": 32,
    "depth": 2,
    "heads": 4,
    "ffn_dim": 64,
    "dropout": 0.0,
}
TINY_AUDIONTT = {
    "_target_": "distillery.models.encoders.AudioNTT",
    "n_mels": 64,
    "channels": 8,
    "dim": 32,
    "dropout": 0.0,
}


def compose(run_dir: Path, cache: Path, *overrides: str) -> DictConfig:
    return compose_config(
        [
            *FAST,
            f"run_dir={run_dir}",
            f"data.cache_dir={cache}",
            "debug.trainer.max_epochs=2",  # 3 batches per epoch (smoke): 6 steps
            *overrides,
        ]
    )


def set_stage(cfg: DictConfig, name: str, batch: int, trainer: dict | None = None) -> None:
    """Batch size and trainer of stage ``name``; record its training; no evaluation."""
    stage = cfg.pipeline.stages[name]
    with open_dict(cfg):
        stage.data.batch_size = batch
        stage.evaluate = False
        stage.trainer.update({"precision": "64-true"} | (trainer or {}))
        stage.callbacks["record"] = {"_target_": "tests.ddp_equivalence_worker.RecordTraining"}


def only_stage(cfg: DictConfig, name: str) -> None:
    with open_dict(cfg):
        for other in [s for s in cfg.pipeline.stages if s != name]:
            del cfg.pipeline.stages[other]
        cfg.pipeline.order = [name]
        cfg.pipeline.stages[name].inputs = {}


def finetune_case(tmp: Path, cache: Path, encoder: dict, trainer: dict) -> list[DictConfig]:
    cfgs = []
    for batch, extra, sub in ((BATCH, {}, "one"), (BATCH // 2, trainer, "two")):
        cfg = compose(tmp / sub, cache, "experiment=supervised")
        with open_dict(cfg):
            cfg.pipeline.stages.finetune.module.encoder = encoder
        set_stage(cfg, "finetune", batch, extra)
        cfgs.append(cfg)
    return cfgs


def coss_case(tmp: Path, cache: Path) -> list[DictConfig]:
    from distillery.models.encoders import AudioNTT
    from distillery.models.io import save_encoder

    teacher_cfg = TINY_AUDIONTT | {"channels": 4, "dim": 24}
    torch.manual_seed(0)
    kwargs = {k: v for k, v in teacher_cfg.items() if k != "_target_"}
    save_encoder(tmp / "teacher.pt", AudioNTT(**kwargs).eval(), teacher_cfg)
    cfgs = []
    for batch, extra, sub in ((BATCH, {}, "one"), (BATCH // 2, DDP, "two")):
        cfg = compose(tmp / sub, cache, "experiment=coss")
        only_stage(cfg, "coss")
        with open_dict(cfg):
            module = cfg.pipeline.stages.coss.module
            module.teacher = str(tmp / "teacher.pt")
            module.encoder = TINY_TRANSFORMER
            module.num_neighbours, module.neighbour_pool = 3, 7  # 2 anchors of 4, 1 per rank
        set_stage(cfg, "coss", batch, extra)
        cfgs.append(cfg)
    return cfgs


def prune_case(tmp: Path, cache: Path) -> list[DictConfig]:
    cfgs = []
    for batch, extra, sub in ((BATCH, {}, "one"), (BATCH // 2, DDP, "two")):
        cfg = compose(tmp / sub, cache, "experiment=dphubert")
        only_stage(cfg, "prune_distill")
        with open_dict(cfg):
            module = cfg.pipeline.stages.prune_distill.module
            module.teacher = TINY_TRANSFORMER  # random weights, the same in both runs (seeded)
            module.distill_layers = [0, 1, 2]
            module.gate_noise = "shared"
        set_stage(cfg, "prune_distill", batch, extra)
        cfgs.append(cfg)
    return cfgs


def self_distill_case(tmp: Path, cache: Path) -> list[DictConfig]:
    """UnFuSeD's student on the pseudo-labels of one SSL teacher: the teacher stage runs
    once (one process), its run dir is copied, and both runs resume after it (the stage's
    own trainer and batch size do not change the teacher's config hash, so it is skipped)."""

    def unfused(sub: str) -> DictConfig:
        cfg = compose(tmp / sub, cache, "experiment=unfused")
        with open_dict(cfg):
            del cfg.pipeline.stages["finetune"]
            cfg.pipeline.order = ["ssl", "self_distill"]
            cfg.pipeline.stages.ssl.evaluate = False
            cfg.pipeline.stages.self_distill.module.encoder = TINY_AUDIONTT
            cfg.pipeline.stages.self_distill.module.head_hidden_dim = 32
        return cfg

    from distillery.pipeline.runner import Runner

    teacher_only = unfused("sd-one")
    with open_dict(teacher_only):
        teacher_only.pipeline.order = ["ssl"]
        del teacher_only.pipeline.stages["self_distill"]
    Runner(teacher_only).run()
    shutil.copytree(tmp / "sd-one", tmp / "sd-two")
    one, two = unfused("sd-one"), unfused("sd-two")
    set_stage(one, "self_distill", BATCH)
    set_stage(two, "self_distill", BATCH // 2, DDP)
    return [one, two]


#: case -> its one-process and two-process configs (the last stage of each is checked).
CASES: dict[str, Callable[[Path, Path], list[DictConfig | None]]] = {
    "finetune": lambda tmp, cache: finetune_case(tmp, cache, TINY_TRANSFORMER, DDP),
    "finetune_bn_sync": lambda tmp, cache: finetune_case(tmp, cache, TINY_AUDIONTT, DDP),
    "finetune_bn_per_rank": lambda tmp, cache: [  # two processes only: checks the ranks agree
        None,
        finetune_case(tmp, cache, TINY_AUDIONTT, DDP | {"sync_batchnorm": False})[1],
    ],
    "self_distill": self_distill_case,
    "coss_kd": coss_case,
    "prune_distill": prune_case,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> dict[str, list[dict]]:
    """Every case run with one process, then all their two-process runs in one pair of
    processes (starting processes is most of the time). Per case: the records of the
    one-process run and of ranks 0 and 1."""
    from distillery.pipeline.runner import Runner
    from tests.ddp_equivalence_worker import run_pipelines_worker

    tmp = tmp_path_factory.mktemp("equivalence")
    configs = {name: build(tmp / name, data_cache) for name, build in CASES.items()}
    for one, _ in configs.values():
        if one is not None:
            Runner(one).run()
    spawn_two_ranks(run_pipelines_worker, [two for _, two in configs.values()])
    records = {}
    for name, (one, two) in configs.items():
        stage = two.pipeline.order[-1]
        records[name] = [
            one and torch.load(Path(one.run_dir) / stage / "record-rank0.pt"),
            *(torch.load(Path(two.run_dir) / stage / f"record-rank{r}.pt") for r in (0, 1)),
        ]
    return records


def assert_same_training(records: list[dict]) -> None:
    """Per-step loss (two ranks averaged) and final weights of both runs agree; both ranks
    end with the same weights and BatchNorm statistics."""
    one, *ranks = records
    assert one["steps"] == ranks[0]["steps"] == ranks[1]["steps"] == 6
    curve = torch.tensor([ranks[0]["losses"], ranks[1]["losses"]], dtype=torch.float64).mean(0)
    expected = torch.tensor(one["losses"], dtype=torch.float64)
    torch.testing.assert_close(curve, expected, rtol=1e-10, atol=1e-12)
    for key, value in one["state"].items():
        if value.is_floating_point():
            assert value.dtype == torch.float64, key
            torch.testing.assert_close(ranks[0]["state"][key], value, rtol=0, atol=1e-8, msg=key)
            torch.testing.assert_close(ranks[1]["state"][key], ranks[0]["state"][key], msg=key)


def test_finetune_without_batchnorm(runs: dict[str, list[dict]]) -> None:
    assert_same_training(runs["finetune"])


def test_finetune_with_sync_batchnorm(runs: dict[str, list[dict]]) -> None:
    assert_same_training(runs["finetune_bn_sync"])


def test_self_distill_with_sync_batchnorm(runs: dict[str, list[dict]]) -> None:
    assert_same_training(runs["self_distill"])


def test_coss_kd_on_knn_batches(runs: dict[str, list[dict]]) -> None:
    assert_same_training(runs["coss_kd"])


def test_prune_distill_with_shared_gate_noise(runs: dict[str, list[dict]]) -> None:
    assert_same_training(runs["prune_distill"])


def test_per_rank_batchnorm_statistics_are_averaged_before_use(runs: dict[str, list[dict]]) -> None:
    """``sync_batchnorm: false``: each rank's running statistics come from its own batches
    (different at the last step), and both ranks hold their average after training."""
    _, rank0, rank1 = runs["finetune_bn_per_rank"]
    stats = [k for k in rank0["state"] if k.endswith(("running_mean", "running_var"))]
    assert stats
    for key in stats:
        assert not torch.allclose(rank0["last_step_stats"][key], rank1["last_step_stats"][key])
        torch.testing.assert_close(rank0["state"][key], rank1["state"][key], rtol=0, atol=0)
        mean = (rank0["last_step_stats"][key] + rank1["last_step_stats"][key]) / 2
        torch.testing.assert_close(rank0["state"][key], mean)


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_global_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path: Path, dtype: str) -> None:
    """``sync_batchnorm: true``'s layer: on 2 ranks with half the batch each, output, input
    gradient (through the gathered statistics), parameter gradient and running statistics
    are one BatchNorm2d's on the whole batch: in float64, and with bfloat16 inputs to
    float32 parameters (bf16-mixed autocast), within bfloat16's precision."""
    from tests.ddp_equivalence_worker import global_batchnorm_worker

    spawn_two_ranks(global_batchnorm_worker, str(tmp_path), dtype)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 4, dtype=torch.float64) * 3 + 1
    target = torch.randn_like(x)
    bn = torch.nn.BatchNorm2d(3).double()
    torch.nn.init.uniform_(bn.weight)
    if dtype == "bfloat16":  # the reference: torch's BatchNorm on the same rounded inputs
        x, target = x.bfloat16().double(), target.bfloat16().double()
    whole = x.clone().requires_grad_()
    output = bn(whole)
    (output * target).sum().backward()
    # bfloat16 outputs and input gradients are rounded to 8 bits of mantissa
    tol = {} if dtype == "float64" else {"rtol": 1e-2, "atol": 1e-2}
    for rank in (0, 1):
        got = torch.load(tmp_path / f"bn-{dtype}-rank{rank}.pt")
        assert got["output"].dtype == getattr(torch, dtype)  # the layer keeps its input's dtype
        for key, expected in (
            ("output", output.detach()[rank::2]),
            ("input_grad", whole.grad[rank::2]),
            ("param_grads", torch.cat([bn.weight.grad, bn.bias.grad])),
            ("running", torch.cat([bn.running_mean, bn.running_var])),
        ):
            torch.testing.assert_close(
                got[key].double(), expected, msg=lambda m, k=key: f"{k}: {m}", **tol
            )
        assert got["reverted"]
