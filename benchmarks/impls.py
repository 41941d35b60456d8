"""The trainers under test, behind one interface: ours (the Lightning trainer), diffusers, denoising-diffusion-pytorch.

Each implementation builds its own network at a shape read from one of our YAML recipes and runs the full training
step its users run (noise, forward, MSE, backward, gradient clipping, optimizer step, EMA update) and DDIM sampling.
The recipe's optimizer, gradient clipping and EMA decay are used by all three; EMA updates after every step for all
three (lucidrains' Trainer defaults to every 10th step, which would make its steps cheaper, not faster).
"""

from __future__ import annotations

import copy
import importlib
import logging
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ddpm_lightning.callbacks import EMA
from ddpm_lightning.module import DiffusionModule

Precision = Literal["fp32", "bf16"]
#: model arguments of a recipe that are not the network or the diffusion (the bench runs a fixed-rate step)
NOT_MODEL_SHAPE = ("optimizer", "lr_scheduler", "lr_scheduler_interval", "warmup_steps", "sampling")
#: optimizer arguments that choose how the update is computed, not what it computes: ours takes the recipe's; the
#: peers run as their examples do (torch's default: a per-parameter loop on CPU, foreach on CUDA)
OPTIMIZER_SWITCHES = ("fused", "foreach", "capturable")
#: called after each completed training step with its index
StepHook = Callable[[int], None]


@dataclass(frozen=True)
class Shape:
    """A benchmark shape: the model section of a recipe plus the data-decided image size, optimizer, EMA decay."""

    name: str
    in_channels: int
    image_size: int
    model_args: dict[str, Any]
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    grad_clip: float | None
    ema_decay: float
    overrides: dict[str, Any] = field(default_factory=dict)
    optimizer_switches: dict[str, Any] = field(default_factory=dict)  # ours only, see OPTIMIZER_SWITCHES


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_shape(name: str, config: Path, overrides: dict[str, Any] | None = None) -> Shape:
    """The shape of ``config``'s model; channels and size from its DataModule class, as the CLI links them."""
    cfg = yaml.safe_load(config.read_text())
    data_cls, data_args = _import(cfg["data"]["class_path"]), cfg["data"].get("init_args", {})
    model_args = {k: v for k, v in cfg["model"].items() if k not in NOT_MODEL_SHAPE} | (overrides or {})
    opt = cfg["model"].get("optimizer", {"class_path": "torch.optim.Adam"})
    opt_args = opt.get("init_args", {})
    emas = [cb for cb in cfg["trainer"].get("callbacks", []) if cb["class_path"].endswith(".EMA")]
    ema_decay = emas[0].get("init_args", {}).get("decay", 0.9999) if emas else 0.9999
    return Shape(
        name=name,
        in_channels=data_cls.native_channels,
        image_size=data_args.get("image_size") or data_cls.native_size,
        model_args=model_args,
        optimizer=partial(
            _import(opt["class_path"]), **{k: v for k, v in opt_args.items() if k not in OPTIMIZER_SWITCHES}
        ),
        grad_clip=cfg["trainer"].get("gradient_clip_val"),
        ema_decay=ema_decay,
        overrides=overrides or {},
        optimizer_switches={k: v for k, v in opt_args.items() if k in OPTIMIZER_SWITCHES},
    )


def autocast(device: torch.device, precision: Precision) -> AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision="bf16"``, else a disabled (fp32) context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Impl:
    """One trainer: ``net`` (the denoiser), ``forward(x, t)``, ``train(images, steps, hook)``, ``sample(n, steps)``."""

    name: str
    version: str
    net: nn.Module

    def __init__(self, shape: Shape, device: torch.device, precision: Precision) -> None:
        self.shape, self.device, self.precision = shape, device, precision

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """One call of the denoiser: x (B, C, H, W), t (B,) -> (B, C, H, W)."""
        return self.net(x, t)

    def train(self, images: Tensor, num_steps: int, on_step_end: StepHook) -> None:
        raise NotImplementedError

    def sample(self, batch_size: int, num_steps: int) -> Tensor:
        raise NotImplementedError


class _PlainLoop(Impl):
    """The training loop of the peers' examples: loss, backward, clip, optimizer step, zero_grad, EMA update."""

    def loss(self, x_start: Tensor) -> Tensor:
        raise NotImplementedError

    def ema_update(self) -> None:
        raise NotImplementedError

    def setup_training(self) -> None:
        self.optimizer = self.shape.optimizer(self.net.parameters())

    def train(self, images: Tensor, num_steps: int, on_step_end: StepHook) -> None:
        self.net.train()
        for step in range(num_steps):
            x_start = images.to(self.device, non_blocking=True)
            with autocast(self.device, self.precision):
                loss = self.loss(x_start)
            loss.backward()
            if self.shape.grad_clip:
                nn.utils.clip_grad_norm_(self.net.parameters(), self.shape.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema_update()
            on_step_end(step)


class Ours(Impl):
    """``DiffusionModule`` trained by a Lightning ``Trainer`` with the :class:`EMA` callback: what ``ddpm fit`` runs."""

    name = "ours"

    def __init__(self, shape: Shape, device: torch.device, precision: Precision) -> None:
        super().__init__(shape, device, precision)
        import ddpm_lightning

        self.version = getattr(ddpm_lightning, "__version__", "")
        optimizer = partial(shape.optimizer, **shape.optimizer_switches)
        self.module = DiffusionModule(
            in_channels=shape.in_channels, image_size=shape.image_size, optimizer=optimizer, **shape.model_args
        ).to(device)
        self.net = self.module.net
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    def train(self, images: Tensor, num_steps: int, on_step_end: StepHook) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few-workers, SLURM and logging hints that do not apply here
            trainer = L.Trainer(
                accelerator="gpu" if self.device.type == "cuda" else "cpu",
                devices=1,
                precision="bf16-mixed" if self.precision == "bf16" else "32-true",
                max_steps=num_steps,
                gradient_clip_val=self.shape.grad_clip,
                callbacks=[EMA(decay=self.shape.ema_decay, warmup=True), _HookCallback(on_step_end)],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                limit_val_batches=0,
            )
            batch = (images, torch.zeros(images.shape[0], dtype=torch.long))
            trainer.fit(self.module, train_dataloaders=DataLoader(_Repeat(batch, num_steps), batch_size=None))

    def sample(self, batch_size: int, num_steps: int) -> Tensor:
        self.module.to(self.device)  # the Trainer hands the module back on the CPU
        with autocast(self.device, self.precision):
            return self.module.sample(batch_size, sampler="ddim", num_steps=num_steps)


class _Repeat(Dataset):
    """The same batch ``length`` times: synthetic data, so that the step and not the loading is measured."""

    def __init__(self, batch: tuple[Tensor, Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batch


class _HookCallback(L.Callback):
    def __init__(self, on_step_end: StepHook) -> None:
        self.on_step_end = on_step_end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.on_step_end(trainer.global_step - 1)


def _unet_layout(shape: Shape) -> tuple[list[int], list[bool]]:
    """Per-level widths and whether the level attends, from our U-Net's arguments (its defaults filled in)."""
    args = {k: v.default for k, v in _signature_defaults(DiffusionModule).items()} | shape.model_args
    widths = [args["base_channels"] * m for m in args["channel_mults"]]
    attends = [shape.image_size // 2**level in args["attention_resolutions"] for level in range(len(widths))]
    return widths, attends


def _signature_defaults(cls: type) -> dict[str, Any]:
    import inspect

    return {k: p for k, p in inspect.signature(cls).parameters.items() if p.default is not inspect.Parameter.empty}


def _arg(shape: Shape, name: str) -> Any:
    return shape.model_args.get(name, _signature_defaults(DiffusionModule)[name].default)


class Diffusers(_PlainLoop):
    """diffusers ``UNet2DModel`` at our shape (same block layout and FLOPs), its ``train_unconditional`` step."""

    name = "diffusers"

    def __init__(self, shape: Shape, device: torch.device, precision: Precision) -> None:
        super().__init__(shape, device, precision)
        import diffusers
        from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
        from diffusers.training_utils import EMAModel

        self.version = diffusers.__version__
        widths, attends = _unet_layout(shape)
        heads = _arg(shape, "num_heads")
        attended = [w for w, a in zip(widths, attends) if a] or widths[-1:]
        self.net = UNet2DModel(
            sample_size=shape.image_size,
            in_channels=shape.in_channels,
            out_channels=shape.in_channels,
            block_out_channels=tuple(widths),
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attends),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
            layers_per_block=_arg(shape, "num_res_blocks"),
            attention_head_dim=None if heads == 1 else attended[0] // heads,  # None: one head as wide as the level
            norm_num_groups=_arg(shape, "num_groups"),
            dropout=_arg(shape, "dropout"),
            flip_sin_to_cos=False,  # DDPM's [sin, cos] sinusoids with exponent i / (half - 1)
            freq_shift=1,
        ).to(device)
        num_timesteps = _arg(shape, "num_timesteps")
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule="linear")
        self.pipeline = DDIMPipeline(unet=self.net, scheduler=DDIMScheduler(num_train_timesteps=num_timesteps))
        self.pipeline.set_progress_bar_config(disable=True)
        self.ema = EMAModel(self.net.parameters(), decay=shape.ema_decay, use_ema_warmup=True)
        self.ema.to(device)
        self.setup_training()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t).sample

    def loss(self, x_start: Tensor) -> Tensor:
        noise = torch.randn_like(x_start)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x_start.shape[0],), device=self.device)
        noisy = self.noise_scheduler.add_noise(x_start, noise, t)
        return F.mse_loss(self.net(noisy, t).sample.float(), noise.float())

    def ema_update(self) -> None:
        self.ema.step(self.net.parameters())

    def sample(self, batch_size: int, num_steps: int) -> Tensor:
        self.net.eval()
        with autocast(self.device, self.precision):
            return self.pipeline(batch_size, num_inference_steps=num_steps, output_type="np").images


class Lucidrains(_PlainLoop):
    """denoising-diffusion-pytorch's ``Unet`` at the nearest shape: same base width, levels and attended levels.

    Its design fixes the rest: two ResBlocks per level, linear attention at the levels without full attention,
    4 heads of 32, RMSNorm, pixel-unshuffle downsampling; so its FLOPs differ from ours and are reported.
    """

    name = "denoising-diffusion-pytorch"

    def __init__(self, shape: Shape, device: torch.device, precision: Precision) -> None:
        super().__init__(shape, device, precision)
        from importlib.metadata import version

        import denoising_diffusion_pytorch.denoising_diffusion_pytorch as ddp
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
        from ema_pytorch import EMA as LucidEMA

        if not isinstance(ddp.tqdm, partial):  # its sampling loop has no switch for the progress bar
            ddp.tqdm = partial(ddp.tqdm, disable=True)

        self.version = version("denoising-diffusion-pytorch")
        widths, attends = _unet_layout(shape)
        base = _arg(shape, "base_channels")
        mults = tuple(w // base for w in widths)
        self.net = Unet(
            dim=base,
            dim_mults=mults,
            channels=shape.in_channels,
            dropout=_arg(shape, "dropout"),
            full_attn=tuple(attends),
        )
        self.diffusion = GaussianDiffusion(
            self.net,
            image_size=shape.image_size,
            timesteps=_arg(shape, "num_timesteps"),
            sampling_timesteps=50,
            objective="pred_noise",
            beta_schedule="linear",
        ).to(device)
        self.ema = LucidEMA(self.net, beta=shape.ema_decay, update_after_step=0, update_every=1).to(device)
        self.setup_training()

    def loss(self, x_start: Tensor) -> Tensor:
        return self.diffusion((x_start + 1) / 2)  # it takes images in [0, 1] and normalises them itself

    def ema_update(self) -> None:
        self.ema.update()

    def sample(self, batch_size: int, num_steps: int) -> Tensor:
        self.diffusion.sampling_timesteps = num_steps
        self.diffusion.is_ddim_sampling = num_steps < self.diffusion.num_timesteps
        self.net.eval()
        with autocast(self.device, self.precision):
            return self.diffusion.sample(batch_size=batch_size)


#: every implementation, ours first; a peer whose package is missing is skipped with a note
IMPLS: dict[str, type[Impl]] = {"ours": Ours, "diffusers": Diffusers, "lucidrains": Lucidrains}
PEER_PACKAGES = {"diffusers": "diffusers", "lucidrains": "denoising-diffusion-pytorch"}


def build_impls(
    names: Iterable[str], shape: Shape, device: torch.device, precision: Precision
) -> tuple[list[Impl], list[str]]:
    """The implementations that can be built here, and one note per skipped one."""
    impls, notes = [], []
    for name in names:
        if name not in IMPLS:
            raise ValueError(f"unknown implementation {name!r}; choose from: {', '.join(IMPLS)}")
        try:
            impls.append(IMPLS[name](shape, device, precision))
        except ImportError as err:
            notes.append(
                f"{name} skipped: {PEER_PACKAGES.get(name, name)} is not installed ({err.name}); "
                "`pip install -e .[bench]` adds the peers"
            )
    return impls, notes


def copy_shape(shape: Shape, **changes: Any) -> Shape:
    """``shape`` with some fields replaced (a dataclass copy)."""
    return copy.replace(shape, **changes) if hasattr(copy, "replace") else Shape(**{**shape.__dict__, **changes})
