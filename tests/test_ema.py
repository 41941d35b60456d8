"""EMA callback: the update against its closed form, the warm-up of the decay, and the power-function EMA
(``sigma_rel``) against Karras et al.'s recurrence and the post-hoc EMA callback's own kept EMA in a real fit."""

from __future__ import annotations

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from ddpm_lightning.callbacks.ema import EMA, ema_decay


def test_decay_warmup_closed_form():
    assert ema_decay(0.999, 0, warmup=True) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay(0.999, 90, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 10**6, warmup=True) == 0.999  # capped at the configured decay
    assert ema_decay(0.999, 0, warmup=False) == 0.999


@pytest.mark.parametrize("warmup", [True, False])
def test_update_matches_recurrence(warmup):
    ema = EMA(decay=0.9, warmup=warmup)
    net = torch.nn.Linear(3, 2)
    avg = AveragedModel(net, multi_avg_fn=ema.multi_avg, use_buffers=True)
    expected = [p.detach().clone() for p in net.parameters()]  # the first update copies the weights
    avg.update_parameters(net)
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, net.parameters())]
        avg.update_parameters(net)
    for e, a in zip(expected, avg.module.parameters()):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_should_update_schedule():
    ema = EMA(decay=0.99, update_every_n_steps=2, start_step=4)
    assert [s for s in range(10) if ema.should_update(step_idx=s)] == [4, 6, 8]
    assert not ema.should_update(epoch_idx=3)


def test_sigma_rel_update_is_the_power_function_ema():
    """decay_t = (1 - 1/t)^(gamma + 1) at update t: with sigma_rel 0.10 (gamma 6.94) the average after T updates
    weights update t by (gamma + 1) t^gamma / T^(gamma + 1) (for large T), its relative std is sigma_rel."""
    ema = EMA(sigma_rel=0.10)
    assert ema.gamma == pytest.approx(6.94, abs=0.01)
    net = torch.nn.Linear(1, 1, bias=False)
    avg = AveragedModel(net, multi_avg_fn=ema.multi_avg, use_buffers=True)
    T = 2000
    for t in range(1, T + 1):  # the weight is t/T at update t: the average is sum_t w_t t / T
        with torch.no_grad():
            net.weight.fill_(t / T)
        avg.update_parameters(net)
    g = ema.gamma
    # the mean of the profile p(t) = (g + 1) t^g / T^(g + 1) over [0, T] is (g + 1) / (g + 2) T
    assert avg.module.weight.item() == pytest.approx((g + 1) / (g + 2), rel=2e-3)


@pytest.mark.slow
def test_sigma_rel_ema_in_a_fit_equals_the_post_hoc_ema_kept_at_that_length(shared_data, tmp_path, monkeypatch):
    """A real fit with EMA(sigma_rel=0.10) beside PostHocEMA (which keeps 0.05 and 0.10): the checkpoint's EMA
    weights are the post-hoc callback's 0.10 EMA at the last step (two implementations of one recurrence)."""
    import yaml
    from scaleout import callback, load_ckpt, only_run_dir, recipe_args, write_fragment

    from ddpm_lightning.cli import build_cli

    fragment = write_fragment(
        tmp_path / "f.yaml",
        shared_data,
        steps_per_epoch=6,
        ckpt_every=6,
        extra_callbacks=(callback("ddpm_lightning.callbacks.PostHocEMA", every_n_steps=6),),
    )
    cfg = yaml.safe_load(fragment.read_text())
    cfg["trainer"]["callbacks"][0]["init_args"] = {"sigma_rel": 0.10}  # the recipe's decay stays: sigma_rel wins
    fragment.write_text(yaml.safe_dump(cfg, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    build_cli(["fit", *recipe_args("mnist.yaml", fragment)])
    ckpts = only_run_dir(tmp_path) / "checkpoints"
    state = load_ckpt(ckpts / "last.ckpt")
    snap = torch.load(ckpts / "phema" / "phema-0000006.pt", weights_only=True)
    assert state["global_step"] == snap["step"] == 6 and snap["sigma_rels"][1] == 0.10
    raw = state["current_model_state"]
    for name, value in snap["states"][1].items():
        torch.testing.assert_close(state["state_dict"][name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(raw[n], v) for n, v in snap["states"][1].items())  # and not the raw weights


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"decay": 1.0}, "decay"),
        ({"update_every_n_steps": 0}, "every"),
        ({"sigma_rel": 0.5}, r"sigma_rel must be in \(0, 0.2887\)"),
    ],
)
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        EMA(**kwargs)
