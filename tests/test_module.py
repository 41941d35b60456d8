"""DiffusionModule: checkpoints keep EMA weights, sampling, label dropout, LR schedules, and real-data learning."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.callbacks import EMA
from ddpm_lightning.module import DiffusionModule

TINY = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, num_groups=4, num_timesteps=50)


def _tiny_model(**kw) -> DiffusionModule:
    args = dict(in_channels=1, image_size=8, num_classes=3, **TINY)
    args.update(kw)
    return DiffusionModule(**args)


def _loader(n: int = 32) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.randint(0, 3, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _trainer(tmp_path, **kw) -> L.Trainer:
    args = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EMA(decay=0.9), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    args.update(kw)
    return L.Trainer(**args)


def test_checkpoint_round_trip_keeps_ema_weights(tmp_path):
    L.seed_everything(0)
    model = _tiny_model(conditional=True, cond_drop_prob=0.2)
    trainer = _trainer(tmp_path)
    trainer.fit(model, _loader(), _loader(16))
    ema_cb = trainer.callbacks[0]
    ema_state = {k: v.clone() for k, v in ema_cb._average_model.module.state_dict().items()}
    path = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) >= {"state_dict", "current_model_state", "averaging_state"}
    for k, v in ckpt["state_dict"].items():
        torch.testing.assert_close(v, ema_state[k], rtol=0, atol=0)
    assert not torch.equal(ckpt["state_dict"]["net.conv_in.weight"], ckpt["current_model_state"]["net.conv_in.weight"])

    # loading for inference: needs no config (hyperparameters are saved) and gets the EMA weights
    loaded = DiffusionModule.load_from_checkpoint(path, weights_only=True)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, ema_state[k], rtol=0, atol=0)

    # resuming restores both the raw weights and the EMA model exactly
    resumed = _tiny_model(conditional=True, cond_drop_prob=0.2)
    trainer2 = _trainer(tmp_path, max_epochs=2)
    trainer2.fit(resumed, _loader(), _loader(16), ckpt_path=path, weights_only=True)  # no more epochs to run
    for k, v in trainer2.callbacks[0]._average_model.module.state_dict().items():
        torch.testing.assert_close(v, ema_state[k], rtol=0, atol=0)
    assert trainer2.global_step == trainer.global_step


def test_sample_shapes_determinism_and_labels():
    model = _tiny_model(conditional=True)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a = model.sample(6, labels=[0, 1, 2, 0, 1, 2], num_steps=5, guidance_scale=2.0, generator=g())
    b = model.sample(6, labels=[0, 1, 2, 0, 1, 2], num_steps=5, guidance_scale=2.0, generator=g())
    assert a.shape == (6, 1, 8, 8) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    x, traj = model.sample(2, sampler="ddpm", generator=g(), return_trajectory=True)
    assert traj.shape == (51, 2, 1, 8, 8) and torch.equal(traj[-1], x)
    assert model.net.training  # sample() restores the training mode
    with pytest.raises(ValueError, match="shape"):
        model.sample(3, labels=[1, 2])
    with pytest.raises(ValueError, match="unconditional"):
        _tiny_model().sample(2, labels=[0, 1])


def test_label_dropout_rate():
    torch.manual_seed(0)
    model = _tiny_model(conditional=True, cond_drop_prob=0.25)
    y = torch.zeros(40_000, dtype=torch.long)
    dropped = (model._labels_for_training(y) == model.net.null_label).float().mean().item()
    assert abs(dropped - 0.25) < 0.01
    assert _tiny_model()._labels_for_training(y) is None


def test_warmup_chained_with_step_lr(tmp_path):
    from functools import partial

    model = _tiny_model(
        optimizer=partial(torch.optim.SGD, lr=0.01),  # small: the run must stay finite
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        warmup_steps=4,
    )
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[Record()], enable_checkpointing=False)
    trainer.fit(model, _loader(32))  # 4 steps per epoch
    # warm-up: factor 1/4 rising linearly to 1 over 4 steps (1/4 + 3/4 * k/4) in epoch 0; then StepLR halves
    assert lrs == pytest.approx([0.01 * f for f in [0.25, 0.4375, 0.625, 0.8125, 0.5, 0.5, 0.5, 0.5]])


def _lrs_of_fit(tmp_path, model, **trainer_kw) -> list[float]:
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = _trainer(tmp_path, callbacks=[Record()], enable_checkpointing=False, **trainer_kw)
    trainer.fit(model, _loader(32))  # 4 steps per epoch
    return lrs


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_lr_decay_reaches_zero_at_the_trainers_last_step_after_the_warmup(tmp_path, kind):
    """lr_decay takes its length from the trainer (max_steps 10 here, max_epochs below), chains with the warm-up
    (2 steps) and StepLR (x0.5 per epoch), and ends one step short of 0."""
    import math
    from functools import partial

    model = _tiny_model(
        optimizer=partial(torch.optim.SGD, lr=0.01),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        warmup_steps=2,
        lr_decay=kind,
    )
    lrs = _lrs_of_fit(tmp_path, model, max_epochs=-1, max_steps=10)
    warm = [0.5, 0.75] + [1.0] * 8  # LinearLR from 1/2 over 2 steps
    step_lr = [0.5 ** (k // 4) for k in range(10)]
    frac = [max(0, k - 2) / 8 for k in range(10)]
    decay = [1 - f if kind == "linear" else 0.5 * (1 + math.cos(math.pi * f)) for f in frac]
    assert lrs == pytest.approx([0.01 * w * s * d for w, s, d in zip(warm, step_lr, decay)])
    assert lrs[-1] > 0 and decay[-1] == pytest.approx(
        1 / 8 if kind == "linear" else 0.5 * (1 + math.cos(7 * math.pi / 8))
    )

    by_epochs = _lrs_of_fit(tmp_path, _tiny_model(optimizer=partial(torch.optim.SGD, lr=0.01), lr_decay="linear"))
    assert by_epochs == pytest.approx([0.01 * (1 - k / 8) for k in range(8)])  # 2 epochs x 4 steps


def test_lr_decay_without_an_end_step_is_one_line_error(tmp_path):
    model = _tiny_model(lr_decay="cosine")
    with pytest.raises(ValueError, match="set trainer.max_steps or trainer.max_epochs"):
        _trainer(tmp_path, max_epochs=-1, max_time="00:00:01:00").fit(model, _loader(32))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"lr_decay": "exp"}, "unknown lr_decay 'exp'; choose one of: none, linear, cosine"),
        ({"conditional": True, "num_classes": 0}, "conditional"),
        ({"lr_scheduler_interval": "batch"}, "epoch, step"),
        ({"cond_drop_prob": 1.0}, "cond_drop_prob"),
    ],
)
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        _tiny_model(**kwargs)


@pytest.mark.slow
def test_real_mnist_validation_loss_drops(shared_data, tmp_path):
    """120 steps on the real MNIST drive the fixed-grid validation loss to under a quarter of its start."""
    from ddpm_lightning.data import MNISTDataModule

    L.seed_everything(0)
    dm = MNISTDataModule(root=str(shared_data), download=False, batch_size=64, val_size=512)
    model = DiffusionModule(
        in_channels=1,
        image_size=28,
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        num_groups=8,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=120,
        val_check_interval=120,
        limit_val_batches=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, dm)
    end = trainer.callback_metrics["val/loss"].item()
    assert start > 0.5  # an untrained eps-predictor is near the unit variance of the noise
    assert end < 0.25 * start, (start, end)  # measured: 0.9995 -> 0.1046 at 120 steps


def _loss_and_grads(model: DiffusionModule) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training loss and its gradients on a fixed batch, with fixed draws of t, noise, dropout and labels."""
    model.zero_grad(set_to_none=True)  # a fitted model keeps the gradients of its last step
    x_start, y = next(iter(_loader()))
    torch.manual_seed(1)
    t = torch.randint(0, model.diffusion.num_timesteps, (x_start.shape[0],))
    loss = model.diffusion.training_loss(model._denoise_fn(y), x_start, t).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every parameter's gradient agrees up to float rounding: relative error of the whole tensor below 1e-4."""
    assert got.keys() == expected.keys()
    for k, g in expected.items():
        err = float((got[k] - g).norm() / g.norm().clamp_min(1e-12))
        assert err < 1e-4, f"{k}: relative gradient error {err:.2e}"


def _fit(tmp_path, validate: bool = True, **model_kw) -> DiffusionModule:
    L.seed_everything(0)
    model = _tiny_model(**{"conditional": True, "dropout": 0.1, "cond_drop_prob": 0.2} | model_kw)
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(model, _loader(), _loader(16) if validate else None)
    return model


def test_channels_last_gives_the_same_loss_and_gradients_and_checkpoints_load_either_way(tmp_path):
    nets = {}
    for name, flag in [("nchw", False), ("nhwc", True)]:
        torch.manual_seed(0)
        nets[name] = _tiny_model(conditional=True, dropout=0.1, cond_drop_prob=0.2, channels_last=flag)
    loss_a, grads_a = _loss_and_grads(nets["nchw"])
    loss_b, grads_b = _loss_and_grads(nets["nhwc"])
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    _assert_same_gradients(grads_b, grads_a)

    model = _fit(tmp_path, channels_last=True)  # the layout survives the optimizer, the EMA and checkpointing
    conv = model.net.conv_out.weight  # (1, 8, 3, 3): NCHW and NHWC strides differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    as_nchw = DiffusionModule.load_from_checkpoint(ckpt, weights_only=True, channels_last=False)
    as_nhwc = DiffusionModule.load_from_checkpoint(ckpt, weights_only=True)
    assert as_nhwc.net.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert as_nchw.net.conv_out.weight.is_contiguous()
    a = as_nchw.sample(4, labels=[0, 1, 2, 0], num_steps=5, generator=torch.Generator().manual_seed(1))
    b = as_nhwc.sample(4, labels=[0, 1, 2, 0], num_steps=5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_trains_with_the_same_gradients_and_the_same_checkpoint(tmp_path):
    # dropout 0: compiled code draws its dropout masks from its own generator, so they would differ from eager's
    model = _fit(tmp_path, validate=False, torch_compile=True, dropout=0.0)  # one compilation (training mode)
    assert model.net._compiled_call_impl is not None  # fit compiled it
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    eager = _tiny_model(conditional=True, dropout=0.0, cond_drop_prob=0.2)
    assert ckpt["state_dict"].keys() == eager.state_dict().keys()  # no "_orig_mod." prefixes: loads anywhere
    eager.load_state_dict(model.state_dict())
    loss_a, grads_a = _loss_and_grads(eager)
    loss_b, grads_b = _loss_and_grads(model)  # the compiled forward and backward, same weights and draws
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    _assert_same_gradients(grads_b, grads_a)


def test_fused_optimizer_is_clipped_under_bf16_mixed_and_refused_with_fp16(tmp_path, monkeypatch):
    from functools import partial

    # bf16-mixed has no gradient scaler: Lightning's plugin refuses to clip for a fused optimizer, the module clips
    model = _tiny_model(optimizer=partial(torch.optim.AdamW, lr=1e-3, fused=True))
    model.trainer = _trainer(tmp_path, gradient_clip_val=0.5, callbacks=[], precision="bf16-mixed")
    optimizer = model.configure_optimizers()
    assert optimizer.defaults["fused"] is True
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        model.clip_gradients(optimizer, 0.5, "norm")  # Lightning's own path
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    model.configure_gradient_clipping(optimizer, 0.5, "norm")
    assert float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])) == pytest.approx(0.5, rel=1e-5)
    model.configure_gradient_clipping(optimizer, 0.01, "value")
    assert all(float(p.grad.abs().max()) <= 0.01 for p in model.parameters())
    # 16-mixed scales the gradients until the fused step: clipping first would be wrong, so it is refused up front
    monkeypatch.setattr(L.Trainer, "precision", property(lambda self: "16-mixed"))
    with pytest.raises(ValueError, match=r"16-mixed use model.optimizer.init_args.fused: false"):
        model.configure_optimizers()


def test_lr_decay_resumed_with_a_larger_max_steps_decays_to_the_new_end(tmp_path):
    """Stopped at step 2 of a 4-step run and resumed with max_steps 8: the decay goes on from the lr reached
    (0.01 x (1 - 2/4)) and ends at step 8, not at the first run's 4 (where it would have trained on at lr 0)."""
    from functools import partial

    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2 and not trainer.ckpt_path:
                trainer.should_stop = True

    def fit(max_steps, **kw):
        model = _tiny_model(optimizer=partial(torch.optim.SGD, lr=0.01), warmup_steps=0, lr_decay="linear")
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        trainer = _trainer(tmp_path, max_epochs=-1, max_steps=max_steps, callbacks=[Record(), ckpt])
        trainer.fit(model, _loader(32), **kw)

    fit(4)
    assert lrs == pytest.approx([0.01, 0.0075], rel=1e-12)
    fit(8, ckpt_path=tmp_path / "last.ckpt")
    assert lrs[2:] == pytest.approx([0.005 * (1 - k / 8) / (1 - 2 / 8) for k in range(2, 8)], rel=1e-12)

    # a run that ended (lr decayed to 0 at its last step) and is resumed to train longer is told it cannot
    lrs.clear()
    with pytest.warns(UserWarning, match=r"resumed at step 8 with learning rate 0 .* its 4 more steps cannot change"):
        fit(12, ckpt_path=tmp_path / "last.ckpt")
    assert lrs == [0.0] * 4


def test_lr_decay_resumes_on_schedule(tmp_path):
    """Stopped at step 4 of 10 and resumed from last.ckpt, the lr goes on exactly as in the straight run."""
    from functools import partial

    def model():
        return _tiny_model(optimizer=partial(torch.optim.SGD, lr=0.01), warmup_steps=2, lr_decay="cosine")

    straight = _lrs_of_fit(tmp_path / "a", model(), max_epochs=-1, max_steps=10)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 4 and not trainer.ckpt_path:
                trainer.should_stop = True

    def trainer():
        ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
        return _trainer(tmp_path / "b", max_epochs=-1, max_steps=10, callbacks=[Record(), ckpt])

    trainer().fit(model(), _loader(32))
    assert len(lrs) == 4
    trainer().fit(model(), _loader(32), ckpt_path=tmp_path / "b" / "last.ckpt")
    assert lrs == pytest.approx(straight, rel=1e-12)
