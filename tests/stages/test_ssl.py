"""BYOL-A augmentations and the ``ssl`` stage (BYOL, SimCLR, Barlow Twins)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from tests.helpers import compose_config
from torch.utils.data import DataLoader, Dataset

from distillery.augment import BYOLAAugment, MixupWithPastBatches, RandomResizeCrop
from distillery.models.io import load_encoder
from distillery.pipeline.contract import validate
from distillery.stages.registry import stage_class
from distillery.stages.ssl import SSLStage

N_MELS, FRAMES = 16, 24
TINY_ENCODER = {
    "_target_": "distillery.models.encoders.AudioNTT",
    "n_mels": N_MELS,
    "channels": 8,
    "dim": 32,
    "dropout": 0.0,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def _logmel(batch: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, N_MELS, FRAMES, generator=torch.Generator().manual_seed(seed))


def _stage(method: str = "byol", **kwargs) -> SSLStage:
    kwargs.setdefault("optimizer", {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3})
    return SSLStage(
        TINY_ENCODER, method=method, projection_dim=16, projection_hidden_dim=32, **kwargs
    )


# -- augmentations ----------------------------------------------------------------------------
def test_augment_shape_finite_normalised_and_random() -> None:
    torch.manual_seed(0)
    x = _logmel(8)
    augment = BYOLAAugment(memory_size=16)
    v1, v2 = augment(x), augment(x)
    assert v1.shape == x.shape and v1.dtype == torch.float32
    assert torch.isfinite(v1).all() and torch.isfinite(v2).all()
    assert not torch.allclose(v1, x) and not torch.allclose(v1, v2)
    # post-norm: batch-standardised
    assert abs(v1.mean().item()) < 1e-5 and abs(v1.std().item() - 1) < 1e-4
    assert len(augment.mixup) == 16  # both calls fed the memory


def test_augment_reproducible_with_global_seed_and_generator() -> None:
    x = _logmel(4)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        augment = BYOLAAugment()
        outs.append(torch.cat([augment(x), augment(x)]))
    assert torch.equal(outs[0], outs[1])
    a = BYOLAAugment()(x, torch.Generator().manual_seed(5))
    b = BYOLAAugment()(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_mixup_is_identity_with_empty_memory() -> None:
    x = _logmel(4)
    mixup = MixupWithPastBatches(ratio=0.4, memory_size=8)
    assert torch.equal(mixup(x), x)
    assert len(mixup) == 4


def test_mixup_matches_log_mixup_exp_and_stays_between_its_inputs() -> None:
    past, x = _logmel(3, seed=1), _logmel(5, seed=2)
    mixup = MixupWithPastBatches(ratio=0.4, memory_size=8)
    mixup(past)
    out = mixup(x, torch.Generator().manual_seed(7))
    # Replay the draws: mixing weights first, then the memory rows.
    g = torch.Generator().manual_seed(7)
    lam = (0.4 * torch.rand(5, generator=g, dtype=torch.float64)).float().view(5, 1, 1, 1)
    picks = torch.randint(3, (5,), generator=g)
    expected = torch.log((1 - lam) * x.exp() + lam * past[picks].exp())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    low, high = torch.minimum(x, past[picks]), torch.maximum(x, past[picks])
    assert (out >= low - 1e-5).all() and (out <= high + 1e-5).all()
    assert not torch.allclose(out, x)


def test_mixup_memory_is_fifo_and_frozen_in_eval() -> None:
    mixup = MixupWithPastBatches(ratio=0.0, memory_size=5)
    batches = [torch.full((3, 1, 2, 2), float(k)) for k in range(3)]
    for batch in batches:
        mixup(batch)
    assert len(mixup) == 5
    # 9 examples through a memory of 5: the newest five (values 1, 1, 2, 2, 2) remain.
    assert sorted(mixup.memory[:, 0, 0].tolist()) == [1.0, 1.0, 2.0, 2.0, 2.0]
    mixup.eval()
    mixup(torch.full((3, 1, 2, 2), 9.0))
    assert 9.0 not in mixup.memory[:, 0, 0].tolist()


def test_random_resize_crop_without_scaling_is_identity() -> None:
    x = _logmel(4)
    crop = RandomResizeCrop(
        virtual_crop_scale=(1.0, 1.0), freq_scale=(1.0, 1.0), time_scale=(1.0, 1.0)
    )
    torch.testing.assert_close(crop(x), x, rtol=0, atol=1e-4)


def test_random_resize_crop_matches_canvas_crop_resize_reference() -> None:
    """The batched affine-grid version equals BYOL-A's per-example canvas/crop/interpolate."""
    x = _logmel(6)
    crop = RandomResizeCrop()
    out = crop(x, torch.Generator().manual_seed(11))
    params = crop.sample_crops(6, (N_MELS, FRAMES), torch.Generator().manual_seed(11))
    canvas_f, canvas_t = int(N_MELS * 1.0), int(FRAMES * 1.5)
    y0, x0 = (canvas_f - N_MELS) // 2, (canvas_t - FRAMES) // 2
    for k in range(6):
        i, j, h, w = (int(v) for v in params[k])
        canvas = torch.zeros(1, 1, canvas_f, canvas_t)
        canvas[..., y0 : y0 + N_MELS, x0 : x0 + FRAMES] = x[k]
        region = canvas[..., i : i + h, j : j + w]
        ref = F.interpolate(region, size=(N_MELS, FRAMES), mode="bilinear", align_corners=True)
        torch.testing.assert_close(out[k : k + 1], ref, rtol=0, atol=1e-4)
    assert (params[:, 2] >= 1).all() and (params[:, 2] <= canvas_f).all()
    assert (params[:, 3] <= canvas_t).all() and (params[:, 0] + params[:, 2] <= canvas_f).all()


# -- stage ------------------------------------------------------------------------------------
def test_kind_is_registered_and_config_validates() -> None:
    assert stage_class("ssl") is SSLStage
    cfg = compose_config(
        [
            "experiment=supervised",
            "run_dir=/tmp/unused",
            "+stage@pipeline.stages.ssl=ssl",
            "pipeline.order=[ssl,finetune]",
        ]
    )
    validate(cfg)
    assert cfg.pipeline.stages.ssl.module.method == "byol"


def test_byol_target_is_an_ema_of_the_online_network() -> None:
    torch.manual_seed(0)
    stage = _stage("byol", ema_decay=0.9)
    for online, target in stage._online_targets():
        for p, q in zip(online.parameters(), target.parameters(), strict=True):
            assert torch.equal(p, q) and not q.requires_grad
    optimizer = stage.configure_optimizers()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]}.isdisjoint(
        id(p) for p in stage.target_encoder.parameters()
    )
    old = [q.detach().clone() for q in stage.target_encoder.parameters()]
    loss, _ = stage.ssl_loss(*stage._views(_logmel(8)))
    loss.backward()
    optimizer.step()
    assert all(q.grad is None for q in stage.target_encoder.parameters())
    stage.update_target()
    for p, q, q_old in zip(
        stage.encoder.parameters(), stage.target_encoder.parameters(), old, strict=True
    ):
        torch.testing.assert_close(q, 0.9 * q_old + 0.1 * p.detach())
    assert any(
        not torch.equal(q, q_old)
        for q, q_old in zip(stage.target_encoder.parameters(), old, strict=True)
    )


@pytest.mark.parametrize("method", ["byol", "simclr", "barlow_twins"])
def test_loss_decreases_on_a_fixed_batch(method: str) -> None:
    """30 steps on one fixed pair of augmented views: the objective, its gradients and (BYOL)
    the EMA target are wired so that optimisation makes progress."""
    torch.manual_seed(0)
    stage = _stage(method)
    stage.train()
    optimizer = stage.configure_optimizers()
    views = stage._views(_logmel(16))
    losses = []
    for _ in range(30):
        loss, _ = stage.ssl_loss(*views)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stage.update_target()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (method, losses)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_and_validation_steps_need_no_labels() -> None:
    torch.manual_seed(0)
    stage = _stage("byol")
    batch = {"index": torch.arange(8), "features": _logmel(8)}  # no "label" key
    stage.train()
    loss = stage.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    stage.eval()
    mixup = stage.augment.mixup
    filled, memory = len(mixup), mixup.memory.clone()
    with torch.no_grad():
        stage.validation_step(batch, 0)
    # validation does not feed the mixup memory
    assert len(mixup) == filled == 16 and torch.equal(mixup.memory, memory)


class _Clips(Dataset):
    def __init__(self, n: int) -> None:
        self.features = torch.randn(
            n, 1, N_MELS, FRAMES, generator=torch.Generator().manual_seed(0)
        )

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(i), "features": self.features[i], "label": torch.tensor(0)}


def test_checkpoint_round_trip_keeps_the_target(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    stage = _stage("byol", ema_decay=0.5)
    loader = DataLoader(_Clips(16), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=1,
    )
    trainer.fit(stage, loader, loader)
    assert trainer.global_step == 2
    ckpt = tmp_path / "ssl.ckpt"
    trainer.save_checkpoint(ckpt)
    assert any(
        k.startswith("target_encoder.") for k in torch.load(ckpt, weights_only=False)["state_dict"]
    )

    restored = SSLStage.load_from_checkpoint(ckpt)
    for key, value in stage.state_dict().items():
        if key.endswith("_extra_state"):  # the mixup memory: past examples, not weights
            memory = restored.state_dict()[key]["memory"]
            assert torch.equal(value["memory"], memory) and len(memory) == 2 * 16, key  # 2 views
        else:
            assert torch.equal(value, restored.state_dict()[key]), key
    # The EMA moved the target away from both its start and the online network.
    target, online = stage.target_encoder.state_dict(), stage.encoder.state_dict()
    assert any(not torch.equal(target[k], online[k]) for k in target)

    path = restored.export_artifacts()["encoder"].save(tmp_path / "encoder.pt")
    encoder, cfg = load_encoder(path)
    assert cfg == TINY_ENCODER
    for key, value in encoder.state_dict().items():  # the online encoder, not the target
        assert torch.equal(value, stage.encoder.state_dict()[key]), key


@pytest.mark.ddp
@pytest.mark.slow
def test_every_ranks_mixup_memory_is_checkpointed_and_restored(tmp_path: Path) -> None:
    """2 processes: each rank's mixup memory (its own past batches) comes back to that rank
    when a checkpoint is restored, not rank 0's on both."""
    from tests.helpers import spawn_two_ranks
    from tests.stages.ssl_ddp_worker import mixup_worker

    spawn_two_ranks(mixup_worker, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert not torch.equal(rank0["trained"], rank1["trained"])  # the ranks saw different clips
    for memories in (rank0, rank1):
        assert len(memories["trained"]) == 2 * 2 * 4  # 2 views x 2 batches x 4 clips
        assert torch.equal(memories["restored"], memories["trained"])
