"""DiffusionModule: the LightningModule that wires a U-Net to the Gaussian diffusion process. Glue only.

The network lives in :mod:`ddpm_lightning.nn`, the schedule and the loss in :mod:`ddpm_lightning.diffusion`, the
samplers in :mod:`ddpm_lightning.samplers`. This module draws ``t``, applies label dropout for classifier-free
guidance, logs, and builds the optimizer and the learning-rate schedule chosen in YAML.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ddpm_lightning.checkpointing import rng_states, set_rng_states
from ddpm_lightning.diffusion import GaussianDiffusion, PredictionType
from ddpm_lightning.nn import UNet
from ddpm_lightning.samplers import Generators, guided_denoise_fn, sample
from ddpm_lightning.schedules import ScheduleName, make_betas

SCHEDULER_INTERVALS = ("epoch", "step")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; raised before the optimizer step, so no checkpoint holds its update."""


class SharedFactory:
    """An optimizer / scheduler factory that copies of the module share instead of copying.

    The EMA callback deep-copies the module (``AveragedModel``). LightningCLI's factories reference the CLI, and
    through it the DDP launcher's child processes, which cannot be copied; the copy never builds an optimizer.
    """

    def __init__(self, factory: Callable[..., Any]) -> None:
        self.factory = factory

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.factory(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedFactory:
        return self


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
        cond_drop_prob: probability of replacing a label by the null class during training (Ho & Salimans 2022).
        val_timesteps: validation loss is averaged over this many fixed, evenly spaced t with fixed noise, so the
            curve measures the model and not the draw of t.
        optimizer: optimizer class and arguments (YAML ``class_path``/``init_args``).
        lr_scheduler: optional learning-rate scheduler (e.g. ``torch.optim.lr_scheduler.StepLR``).
        lr_scheduler_interval: step the scheduler every ``epoch`` or every ``step``.
        warmup_steps: linear learning-rate warm-up over this many optimizer steps, from ``lr / warmup_steps`` to
            ``lr`` (0 = none); multiplies with ``lr_scheduler``, which keeps its own interval.
        channels_last: keep the network's 4-D weights channels-last (NHWC), the layout oneDNN and cuDNN convolutions
            prefer (activations follow the weights). Same results up to float rounding; its measured effect is in
            ``benchmarks/ABLATIONS.md``.
        torch_compile: compile the network with ``torch.compile`` when ``fit`` starts (the first steps pay for the
            compilation). Checkpoints are the same either way; the EMA copy and sampling outside ``fit`` stay eager.
            Its measured effect is in ``benchmarks/ABLATIONS.md``.
    """

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
        cond_drop_prob: float = 0.0,
        val_timesteps: int = 10,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        warmup_steps: int = 0,
        channels_last: bool = False,
        torch_compile: bool = False,
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
        if val_timesteps < 1 or warmup_steps < 0:
            raise ValueError("val_timesteps must be >= 1 and warmup_steps >= 0")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = UNet(
            in_channels=in_channels,
            image_size=image_size,
            base_channels=base_channels,
            channel_mults=tuple(channel_mults),
            num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(attention_resolutions),
            dropout=dropout,
            num_classes=num_classes if conditional else None,
            num_heads=num_heads,
            num_groups=num_groups,
            norm_eps=norm_eps,
            downsample_padding=downsample_padding,
            time_freq_shift=time_freq_shift,
            time_flip_sin_to_cos=time_flip_sin_to_cos,
            attention_head_dim=attention_head_dim,
            init_from=init_from,
        )
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        betas = make_betas(schedule, num_timesteps, **(schedule_params or {}))
        self.diffusion = GaussianDiffusion(betas, prediction_type=prediction_type, min_snr_gamma=min_snr_gamma)
        self.optimizer_factory = SharedFactory(optimizer)
        self.lr_scheduler_factory = SharedFactory(lr_scheduler) if lr_scheduler is not None else None
        self._rng_states_to_restore: dict[str, Tensor] | None = None  # from a checkpoint, set at on_train_start
        self._effective_batch_pending = False
        self._compiled = False  # the network is compiled once, by the first fit

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
        t = torch.randint(0, self.diffusion.num_timesteps, (x_start.shape[0],), device=x_start.device)
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

    # -- fit-level hooks: compilation, effective batch size, exact resume ----------------------------------------
    def on_fit_start(self) -> None:
        # here, not in configure_model: the EMA callback has copied the module in its setup, so the copy stays eager
        if self.hparams.torch_compile and not self._compiled:
            self.net.compile()  # in place: parameter names, and so checkpoints, do not change
            self._compiled = True

    def on_train_start(self) -> None:
        if self._rng_states_to_restore is not None and self.trainer.ckpt_path:
            # here, after the sanity check and the loaders' set-up, right before the first resumed step: t, noise
            # and dropout masks continue as in the uninterrupted run
            set_rng_states(self._rng_states_to_restore, self.device)
        self._rng_states_to_restore = None
        self._effective_batch_pending = True

    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if self._effective_batch_pending:
            self._effective_batch_pending = False
            self._log_effective_batch_size(batch[0].shape[0])

    def _log_effective_batch_size(self, per_device: int) -> None:
        """Log per-device batch x accumulation x devices once per fit (direct to the loggers: not every step logs)."""
        accumulate, world = self.trainer.accumulate_grad_batches, self.trainer.world_size
        effective = per_device * accumulate * world
        rank_zero_info(
            f"effective batch size {effective} = {per_device} per device x {accumulate} accumulated x {world} devices"
        )
        for logger in self.loggers:
            logger.log_metrics({"train/effective_batch_size": effective}, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_states(self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_states_to_restore = checkpoint.get("rng_states")

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
        sampler: Literal["ddpm", "ddim"] = "ddim",
        num_steps: int = 50,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        variance: Literal["fixed_small", "fixed_large"] = "fixed_small",
        clip_x0: bool = True,
        generator: Generators = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Draw ``num_samples`` images in [-1, 1], shape (N, C, H, W), with the weights currently in the module.

        ``labels`` (N,) selects classes on a conditional model (None: unconditional / null class);
        ``guidance_scale`` w gives ``uncond + w (cond - uncond)`` (1: plain conditional). ``sampler="ddpm"`` runs
        all T ancestral steps (``variance`` chooses sigma_t^2 = beta-tilde or beta); ``"ddim"`` runs ``num_steps``
        steps with stochasticity ``eta``. With ``return_trajectory`` also returns x_t for every step,
        (steps + 1, N, C, H, W), from pure noise to the sample.
        """
        hp = self.hparams
        y = None
        if labels is not None:
            if not self.conditional:
                raise ValueError("labels given, but this model is unconditional (conditional=false)")
            y = torch.as_tensor(labels, device=self.device, dtype=torch.long)
            if y.shape != (num_samples,):
                raise ValueError(f"labels must have shape ({num_samples},), got {tuple(y.shape)}")
        if self.conditional:
            denoise = guided_denoise_fn(self.net, y, guidance_scale, self.net.null_label)
        else:
            denoise = self._denoise_fn(None)
        shape = (num_samples, hp.in_channels, hp.image_size, hp.image_size)
        kwargs: dict[str, Any] = {"variance": variance} if sampler == "ddpm" else {"num_steps": num_steps, "eta": eta}
        with self._eval_mode():
            return sample(
                denoise,
                self.diffusion,
                shape,
                sampler=sampler,
                generator=generator,
                device=self.device,
                clip_x0=clip_x0,
                return_trajectory=return_trajectory,
                progress=progress,
                **kwargs,
            )
