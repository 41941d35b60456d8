"""DiffusionModule: the LightningModule that wires a U-Net to the Gaussian diffusion process. Glue only.

The network lives in :mod:`ddpm_lightning.nn`, the schedule and the loss in :mod:`ddpm_lightning.diffusion`, the
samplers in :mod:`ddpm_lightning.samplers`. This module draws ``t``, applies label dropout for classifier-free
guidance, logs, and builds the optimizer and the learning-rate schedule chosen in YAML.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ddpm_lightning.diffusion import (
    EDM_LOGNORMAL_MEAN,
    EDM_LOGNORMAL_STD,
    GaussianDiffusion,
    PredictionType,
    TimestepSampling,
)
from ddpm_lightning.hub_import import load_diffusers_unet
from ddpm_lightning.nn import UNet
from ddpm_lightning.nn.unet import SHAPE_OPTIONS
from ddpm_lightning.samplers import Generators, guided_denoise_fn
from ddpm_lightning.sampling import DEFAULT_SAMPLING, SamplingConfig, sample
from ddpm_lightning.schedules import ScheduleName, make_betas

SCHEDULER_INTERVALS = ("epoch", "step")
LR_DECAYS = ("none", "linear", "cosine")
LRDecay = Literal["none", "linear", "cosine"]


def lr_decay_factor(kind: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the learning rate at optimizer step ``step`` (0-based): 1 through the warm-up, then ``linear``
    or ``cosine`` from 1 down to 0 at ``total_steps`` (the run's last step is taken with a small but non-zero lr)."""
    if kind == "none" or step < warmup_steps:
        return 1.0
    frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


class _DecayRatio:
    """``f(k) / f(k - 1)`` of :func:`lr_decay_factor`, for a chainable ``MultiplicativeLR`` (picklable).

    ``total_steps`` is set when training starts (:meth:`DiffusionModule.on_train_start`), from the trainer of that
    ``fit``: a run resumed with a larger ``max_steps`` decays to 0 at the new end, from the lr it had reached. (Asking
    the trainer in ``configure_optimizers`` would build the training loader before the checkpoint restores its
    position, and a run resumed mid-epoch would start its epoch over.)
    """

    def __init__(self, kind: str, warmup_steps: int, total_steps: int | None = None) -> None:
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if self.total_steps is None:
            raise RuntimeError("lr_decay stepped before training started (its total step count is not known yet)")
        prev = lr_decay_factor(self.kind, step - 1, self.warmup_steps, self.total_steps)
        return lr_decay_factor(self.kind, step, self.warmup_steps, self.total_steps) / prev if prev > 0 else 0.0


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; raised before the optimizer step, so no checkpoint holds its update."""


class DiffusionModule(L.LightningModule):
    """A DDPM (Ho et al. 2020): U-Net noise predictor + Gaussian diffusion, trained with the simple MSE loss.

    Data-decided sizes (``in_channels``, ``image_size``, ``num_classes``) are linked from the DataModule by the CLI.

    Args:
        in_channels: image channels (linked from ``data.channels``).
        image_size: image side length (linked from ``data.image_size``).
        num_classes: number of labels in the data (linked from ``data.num_classes``); used when ``conditional``.
        conditional: condition on class labels (with a null class for classifier-free guidance).
        base_channels, channel_mults, num_res_blocks, attention_resolutions, dropout, num_heads, num_groups: the
            U-Net's shape, see :class:`ddpm_lightning.nn.UNet`.
        norm_eps, downsample_padding, time_freq_shift, time_flip_sin_to_cos, attention_head_dim: U-Net details in
            which diffusers' UNet2DModel ports differ (defaults: the DDPM layout), see :class:`ddpm_lightning.nn.UNet`.
        init_from: a diffusers UNet2DModel folder (or a pipeline folder with ``unet/``) whose safetensors weights
            initialise the U-Net, after checking that its config and tensor shapes are this U-Net's.
        schedule: beta schedule name (linear, cosine, sigmoid, polynomial).
        num_timesteps: diffusion steps T (>= 2).
        schedule_params: extra parameters of the schedule (e.g. ``{s: 0.008}`` for cosine).
        prediction_type: what the network predicts: ``eps``, ``x0`` or ``v``.
        min_snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023); ``None`` for the plain loss.
        timestep_sampling: how training draws t: ``uniform`` (Ho et al. 2020) or ``lognormal`` (EDM's noise-level
            distribution, Karras et al. 2022, mapped to the discrete t through log sigma), see
            :data:`ddpm_lightning.diffusion.TimestepSampling`.
        lognormal_mean, lognormal_std: mean and std of ln sigma for ``lognormal`` (EDM: -1.2, 1.2).
        cond_drop_prob: probability of replacing a label by the null class during training (Ho & Salimans 2022).
        val_timesteps: validation loss is averaged over this many fixed, evenly spaced t with fixed noise, so the
            curve measures the model and not the draw of t.
        optimizer: optimizer class and arguments (YAML ``class_path``/``init_args``).
        lr_scheduler: optional learning-rate scheduler (e.g. ``torch.optim.lr_scheduler.StepLR``).
        lr_scheduler_interval: step the scheduler every ``epoch`` or every ``step``.
        warmup_steps: linear learning-rate warm-up over this many optimizer steps, from ``lr / warmup_steps`` to
            ``lr`` (0 = none); multiplies with ``lr_scheduler``, which keeps its own interval.
        lr_decay: anneal the learning rate to 0 at the end of training, ``linear`` or ``cosine`` from the end of
            the warm-up (``none``: keep it). The length is the trainer's (``max_steps``, or ``max_epochs`` x batches),
            never retyped; multiplies with ``lr_scheduler``. For a fixed budget the last steps are then small, so the
            raw weights at the end are already an average of sorts (experiments/studies/ema_length.yaml). A resumed
            run keeps the schedule it started with (its length is in the checkpoint).
        channels_last: keep the network's 4-D weights channels-last (NHWC), the layout oneDNN and cuDNN convolutions
            prefer (activations follow the weights). Same results up to float rounding; its measured effect is in
            ``benchmarks/ABLATIONS.md``.
        torch_compile: compile the network with ``torch.compile`` when ``fit`` starts (the first steps pay for the
            compilation). Checkpoints are the same either way; the EMA copy and sampling outside ``fit`` stay eager.
            Its measured effect is in ``benchmarks/ABLATIONS.md``.
        sampling: how :meth:`sample` draws by default (YAML ``model.sampling``; ``ddpm sample --config`` reads it).
    """

    #: attributes the EMA callback leaves out of its copy of the module: the copy never builds an optimizer, and
    #: LightningCLI's factories reference the CLI (and through it the DDP launcher's processes), which cannot be copied
    not_averaged = ("optimizer_factory", "lr_scheduler_factory")

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int = 0,
        conditional: bool = False,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        num_heads: int = 1,
        num_groups: int = 32,
        norm_eps: float = 1e-5,
        downsample_padding: Literal["symmetric", "bottom_right"] = "symmetric",
        time_freq_shift: int = 1,
        time_flip_sin_to_cos: bool = False,
        attention_head_dim: int | None = None,
        init_from: str | None = None,
        schedule: ScheduleName = "linear",
        num_timesteps: int = 1000,
        schedule_params: dict[str, Any] | None = None,
        prediction_type: PredictionType = "eps",
        min_snr_gamma: float | None = None,
        timestep_sampling: TimestepSampling = "uniform",
        lognormal_mean: float = EDM_LOGNORMAL_MEAN,
        lognormal_std: float = EDM_LOGNORMAL_STD,
        cond_drop_prob: float = 0.0,
        val_timesteps: int = 10,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        warmup_steps: int = 0,
        lr_decay: LRDecay = "none",
        channels_last: bool = False,
        torch_compile: bool = False,
        sampling: SamplingConfig = DEFAULT_SAMPLING,
    ) -> None:
        super().__init__()
        if conditional and num_classes < 1:
            raise ValueError("conditional=true needs a dataset with class labels (num_classes >= 1)")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if lr_scheduler_interval not in SCHEDULER_INTERVALS:
            raise ValueError(
                f"unknown lr_scheduler_interval {lr_scheduler_interval!r}; choose one of: "
                + ", ".join(SCHEDULER_INTERVALS)
            )
        if lr_decay not in LR_DECAYS:
            raise ValueError(f"unknown lr_decay {lr_decay!r}; choose one of: " + ", ".join(LR_DECAYS))
        if val_timesteps < 1 or warmup_steps < 0:
            raise ValueError("val_timesteps must be >= 1 and warmup_steps >= 0")
        self.sampling = SamplingConfig.of(sampling)  # a checkpoint's hyperparameters hold it as a plain dict
        # init_from is where the first weights came from: a checkpoint holds its own, and must load without that folder
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "sampling", "init_from"])
        self.hparams["sampling"] = self.sampling.to_dict()  # plain values: loadable with weights_only=True
        shape = {name: self.hparams[name] for name in SHAPE_OPTIONS}
        self.net = UNet(
            in_channels=in_channels,
            image_size=image_size,
            num_classes=num_classes if conditional else None,
            **shape,
        )
        if init_from is not None:  # the folder is read and checked here; the network only receives its weights
            load_diffusers_unet(init_from, self.net)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        betas = make_betas(schedule, num_timesteps, **(schedule_params or {}))
        self.diffusion = GaussianDiffusion(
            betas,
            prediction_type=prediction_type,
            min_snr_gamma=min_snr_gamma,
            timestep_sampling=timestep_sampling,
            lognormal_mean=lognormal_mean,
            lognormal_std=lognormal_std,
        )
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._compiled = False  # the network is compiled once, by the first fit
        self._lr_decay: _DecayRatio | None = None  # set by configure_optimizers when lr_decay is not "none"

    # -- conditioning ------------------------------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        return bool(self.hparams.conditional)

    def _labels_for_training(self, y: Tensor) -> Tensor | None:
        """Labels fed to the net: None if unconditional; else y with a fraction replaced by the null class."""
        if not self.conditional:
            return None
        p = self.hparams.cond_drop_prob
        if p > 0:
            drop = torch.rand(y.shape, device=y.device) < p  # (B,)
            y = torch.where(drop, torch.full_like(y, self.net.null_label), y)
        return y

    def _denoise_fn(self, y: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda x_t, t: self.net(x_t, t, y)

    # -- steps ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x_start, y = batch  # (B, C, H, W) in [-1, 1], (B,)
        t = self.diffusion.sample_timesteps(x_start.shape[0], x_start.device)
        loss = self.diffusion.training_loss(self._denoise_fn(self._labels_for_training(y)), x_start, t).mean()
        if self._trainer is None:
            return loss
        # the mean over all ranks (a copy: the all-reduce is in place): what is logged, and what every rank checks
        mean_loss = self.trainer.strategy.reduce(loss.detach().clone(), reduce_op="mean")
        self.log("train/loss", mean_loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x_start.shape[0])
        self._stop_if_not_finite(mean_loss, batch_idx)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _stop_if_not_finite(self, mean_loss: Tensor, batch_idx: int) -> None:
        """Raise before a NaN/inf loss reaches the weights; every rank sees the same mean, so all stop together."""
        if bool(torch.isfinite(mean_loss)):  # one scalar host sync per step
            return
        last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written by this run"
        raise NonFiniteLossError(
            f"train/loss is {mean_loss.item()} at global step {self.global_step} (epoch {self.current_epoch}, batch "
            f"{batch_idx}); stopped before the optimizer step, the last checkpoint is {last} (lower the learning "
            "rate, keep gradient_clip_val, or use bf16-mixed / 32-true rather than 16-mixed)"
        )

    def on_train_start(self) -> None:
        # the decay's length, now that the training loader exists (with its resumed position); on a resume this
        # replaces the length restored with the scheduler's state, so the decay ends where this fit ends
        if self._lr_decay is not None:
            self._lr_decay.total_steps = total = int(self.trainer.estimated_stepping_batches)
            step, groups = self.trainer.global_step, self.trainer.optimizers[0].param_groups
            if 0 < step < total and all(g["lr"] == 0 for g in groups):  # a finished run, resumed to train longer
                rank_zero_warn(
                    f"resumed at step {step} with learning rate 0 (lr_decay: {self.hparams.lr_decay} ended the "
                    f"earlier run here): its {total - step} more steps cannot change the weights; to train longer, "
                    "give the larger trainer.max_steps to the first fit (the decay follows it)"
                )

    # -- compilation -------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # here, not in configure_model: the EMA callback has copied the module in its setup, so the copy stays eager
        if self.hparams.torch_compile and not self._compiled:
            self.net.compile()  # in place: parameter names, and so checkpoints, do not change
            self._compiled = True

    def _fixed_grid_loss(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Mean loss over ``val_timesteps`` evenly spaced t, with noise seeded by the batch index (smooth curve)."""
        x_start, y = batch
        y_in = y if self.conditional else None
        gen = torch.Generator(device=x_start.device).manual_seed(10_000 + batch_idx)
        grid = torch.linspace(0, self.diffusion.num_timesteps - 1, self.hparams.val_timesteps).round().long()
        losses = []
        for t_value in grid.tolist():
            t = torch.full((x_start.shape[0],), t_value, device=x_start.device, dtype=torch.long)
            noise = torch.randn(x_start.shape, generator=gen, device=x_start.device, dtype=x_start.dtype)
            losses.append(self.diffusion.training_loss(self._denoise_fn(y_in), x_start, t, noise=noise).mean())
        return torch.stack(losses).mean()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._fixed_grid_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._fixed_grid_loss(batch, batch_idx)
        self.log("test/loss", loss, sync_dist=True, batch_size=batch[0].shape[0])
        return loss

    # -- optimisation ----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        trainer = self._trainer
        if optimizer.defaults.get("fused") and trainer is not None and trainer.gradient_clip_val:
            if str(trainer.precision) == "16-mixed":  # said here, before any step, not by Lightning at the first
                raise ValueError(
                    "a fused optimizer unscales fp16 gradients inside its step, so they cannot be clipped before it: "
                    "with gradient_clip_val and precision 16-mixed use model.optimizer.init_args.fused: false, or "
                    "precision bf16-mixed / 32-true"
                )
        schedulers = []
        if self.hparams.warmup_steps > 0:
            warmup = torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=1.0 / self.hparams.warmup_steps, total_iters=self.hparams.warmup_steps
            )
            schedulers.append({"scheduler": warmup, "interval": "step", "name": "warmup"})
        self._lr_decay = None
        if self.hparams.get("lr_decay", "none") != "none":
            if trainer is None or (trainer.max_steps == -1 and trainer.max_epochs in (None, -1)):
                raise ValueError(
                    "model.lr_decay anneals to 0 at the end of training: set trainer.max_steps or trainer.max_epochs "
                    "(max_time alone gives no end step)"
                )
            # chainable (it multiplies the lr it finds, as the warm-up and StepLR do): step k's ratio f(k) / f(k - 1)
            self._lr_decay = _DecayRatio(self.hparams.lr_decay, self.hparams.warmup_steps)
            decay = torch.optim.lr_scheduler.MultiplicativeLR(optimizer, self._lr_decay)
            schedulers.append({"scheduler": decay, "interval": "step", "name": "lr_decay"})
        if self.lr_scheduler_factory is not None:
            schedulers.append(
                {"scheduler": self.lr_scheduler_factory(optimizer), "interval": self.hparams.lr_scheduler_interval}
            )
        if not schedulers:
            return optimizer
        return [optimizer], schedulers

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        """Lightning's clipping, except for a fused optimizer without a gradient scaler (32-true, bf16-mixed).

        Lightning's mixed-precision plugin refuses to clip for any fused optimizer, bf16-mixed included, although only
        fp16's gradient scaler (gradients still scaled until the fused step) makes clipping wrong; without a scaler the
        gradients are the true ones, and they are clipped here exactly as Lightning clips them.
        """
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if not gradient_clip_val or not optimizer.defaults.get("fused") or scaler is not None:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # -- sampling --------------------------------------------------------------------------------------------------
    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.net.training
        self.net.eval()
        try:
            yield
        finally:
            self.net.train(was_training)

    @torch.inference_mode()
    def sample(
        self,
        num_samples: int,
        labels: Tensor | Sequence[int] | None = None,
        sampling: SamplingConfig | Mapping[str, Any] | None = None,
        *,
        generator: Generators = None,
        x_T: Tensor | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
        **changes: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Draw ``num_samples`` images in [-1, 1], shape (N, C, H, W), with the weights currently in the module.

        ``sampling`` says how (default: this module's ``sampling``); keyword ``changes`` override its fields, e.g.
        ``model.sample(16, num_steps=10)``. ``labels`` (N,) selects classes on a conditional model (None:
        unconditional / null class); ``guidance_scale`` w gives ``uncond + w (cond - uncond)``. With
        ``return_trajectory`` also returns x_t for every step, (steps + 1, N, C, H, W), from pure noise to the sample.
        """
        config = SamplingConfig.of(sampling if sampling is not None else self.sampling, **changes)
        hp = self.hparams
        y = None
        if labels is not None:
            if not self.conditional:
                raise ValueError("labels given, but this model is unconditional (conditional=false)")
            y = torch.as_tensor(labels, device=self.device, dtype=torch.long)
            if y.shape != (num_samples,):
                raise ValueError(f"labels must have shape ({num_samples},), got {tuple(y.shape)}")
        if self.conditional:
            guide_at = config.guide_at(self.diffusion)
            denoise = guided_denoise_fn(self.net, y, config.guidance_scale, self.net.null_label, guide_at)
        else:
            denoise = self._denoise_fn(None)
        shape = (num_samples, hp.in_channels, hp.image_size, hp.image_size)
        with self._eval_mode():
            return sample(
                denoise,
                self.diffusion,
                shape,
                config,
                generator=generator,
                device=self.device,
                x_T=x_T,
                return_trajectory=return_trajectory,
                progress=progress,
            )

    # -- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "auto") -> DiffusionModule:
        """The module of a checkpoint written by ``ddpm fit`` (its ``state_dict`` holds the EMA weights), loaded with
        ``weights_only=True``, in eval mode on ``device`` (``auto``: cuda if available, else cpu).

        A missing, truncated, corrupt, unsafe or non-DDPM file is a one-line error naming it.
        """
        from ddpm_lightning.checkpointing import checkpoint_load_error

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        device = resolve_device(device)
        try:
            model = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        except Exception as err:
            known = checkpoint_load_error(path, err)  # truncated, corrupt or unsafe: one line naming the file
            if known is None and not isinstance(err, (TypeError, KeyError)):  # TypeError/KeyError: not a DDPM file
                raise
            raise (known or ValueError(f"cannot load checkpoint {str(path)!r}: {err}")) from None
        return model.to(device).eval()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda if available, else cpu; anything else as a torch.device (a bad name is a one-line error)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {str(device)!r}: {str(err).splitlines()[0]}") from None
