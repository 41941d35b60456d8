"""EMA callback: the update against its closed form, and the warm-up of the decay."""

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


@pytest.mark.parametrize(("kwargs", "needle"), [({"decay": 1.0}, "decay"), ({"update_every_n_steps": 0}, "every")])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        EMA(**kwargs)
