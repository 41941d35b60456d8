"""Export a DiffusionModule to diffusers' folder layout (:mod:`ddpm_lightning.hub_import` reads one back).

The folder (``DDPMPipeline.from_pretrained(folder)`` loads it, without ddpm-lightning installed)::

    model_index.json                          DDPMPipeline = UNet2DModel + DDPMScheduler
    unet/config.json                          the UNet2DModel config of our U-Net
    unet/diffusion_pytorch_model.safetensors  the weights, renamed by ddpm_lightning.nn.diffusers_layout
    scheduler/scheduler_config.json           a DDPMScheduler giving our betas, prediction type and clipping
    README.md                                 the model card

Only safetensors are written: a pickled ``.bin`` can run code when loaded. This module imports torch, safetensors
and the standard library only; diffusers is needed by whoever loads the folder, not by us.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ddpm_lightning.hub_card import model_card
from ddpm_lightning.hub_import import WEIGHTS_NAME
from ddpm_lightning.module import DiffusionModule
from ddpm_lightning.nn.diffusers_layout import (
    DIFFUSERS_VERSION,
    to_diffusers,
    unet2d_config,
    weight_table,
)
from ddpm_lightning.schedules import SCHEDULES, make_betas

#: our prediction_type -> DDPMScheduler's
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
#: Nichol & Dhariwal 2021's cosine schedule as diffusers names it: s = 0.008 and betas capped at 0.999
SQUAREDCOS_PARAMS = {"s": 0.008, "max_beta": 0.999}


# -- scheduler ---------------------------------------------------------------------------------------------------
def _schedule_params(name: str, given: dict[str, Any] | None) -> dict[str, Any]:
    """Every parameter of schedule ``name``: its defaults, overridden by ``given``."""
    signature = inspect.signature(SCHEDULES[name])
    defaults = {k: p.default for k, p in list(signature.parameters.items())[1:]}
    return {**defaults, **(given or {})}


def beta_schedule_config(name: str, params: dict[str, Any] | None, betas: Tensor) -> dict[str, Any]:
    """DDPMScheduler fields that give exactly ``betas`` (T,): a schedule diffusers names, else ``trained_betas``.

    * ``linear``: diffusers' ``"linear"`` is ``linspace(beta_start, beta_end, T)``; ours rescales the endpoints by
      1000/T and clips at 0.999, so the endpoints written are ``betas[0]`` and ``betas[-1]``, unless clipping bent
      the line (small T);
    * ``cosine`` with ``s = 0.008`` and the 0.999 cap is diffusers' ``"squaredcos_cap_v2"`` (same formula; the
      1/f(0) normalisation cancels in the ratios);
    * anything else (sigmoid, polynomial, other cosine parameters) is written out as ``trained_betas``.
    """
    b = betas.double()
    if name == "linear" and torch.allclose(
        b, torch.linspace(b[0], b[-1], len(b), dtype=torch.float64), rtol=0, atol=1e-12
    ):
        return {"beta_schedule": "linear", "beta_start": float(b[0]), "beta_end": float(b[-1]), "trained_betas": None}
    if name == "cosine" and _schedule_params(name, params) == SQUAREDCOS_PARAMS:
        return {"beta_schedule": "squaredcos_cap_v2", "trained_betas": None}
    return {"beta_schedule": "linear", "trained_betas": b.tolist()}


def scheduler_config(module: DiffusionModule) -> dict[str, Any]:
    """``scheduler/scheduler_config.json``: a DDPMScheduler with the module's schedule and sampling defaults.

    ``clip_sample`` is our samplers' default (``clip_x0=True``), ``variance_type`` our DDPM default
    (``fixed_small``). ``timestep_spacing="trailing"`` makes a k-step schedule start at t = T-1 (the level of pure
    noise, as ours does) with steps that stay consistent with diffusers' ``t - T // k`` step rule; with all T steps
    every spacing is ours exactly.
    """
    hp = module.hparams
    betas = make_betas(hp.schedule, hp.num_timesteps, **(hp.schedule_params or {}))  # float64; the buffers are float32
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": hp.num_timesteps,
        **beta_schedule_config(hp.schedule, hp.schedule_params, betas),
        "prediction_type": PREDICTION_TYPES[module.diffusion.prediction_type],
        "variance_type": "fixed_small",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "thresholding": False,
        "timestep_spacing": "trailing",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }


# -- export --------------------------------------------------------------------------------------------------------
def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


#: the files an export writes, relative to its folder: nothing else is ever written there, and nothing deleted
EXPORT_FILES = (
    f"unet/{WEIGHTS_NAME}",
    "unet/config.json",
    "scheduler/scheduler_config.json",
    "model_index.json",
    "README.md",
)


def _is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a DDPMPipeline export (its ``model_index.json`` says so)."""
    try:
        return json.loads((folder / "model_index.json").read_text()).get("_class_name") == "DDPMPipeline"
    except (OSError, ValueError, AttributeError):
        return False


def check_export_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """``out_dir`` as a Path if an export may write there: a new or empty folder, or with ``overwrite`` any folder
    (only :data:`EXPORT_FILES` are replaced, nothing else is touched). Else a one-line ValueError saying why."""
    out = Path(out_dir)
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise ValueError(f"out_dir {str(out)!r}: {str(path)!r} is an existing file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        if _is_export(out):
            raise ValueError(
                f"out_dir {str(out)!r} holds an earlier export; pass --overwrite true (overwrite=True) to replace "
                "its files, or name a new folder"
            )
        raise ValueError(
            f"out_dir {str(out)!r} is not empty ({len(entries)} entries, e.g. {entries[0]!r}) and is not an earlier "
            "export; name a new or empty folder, or pass --overwrite true (overwrite=True) to write the export's "
            "files into it (nothing else there is touched)"
        )
    return out


def export_diffusers(
    module: DiffusionModule,
    out_dir: str | Path,
    *,
    name: str | None = None,
    training: dict[str, Any] | None = None,
    metrics: Sequence[str | Path] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``module`` (its current weights: load a checkpoint for the EMA ones) as a diffusers DDPMPipeline folder.

    Args:
        module: the model; its U-Net options must be expressible in UNet2DModel (else a ValueError naming one).
        out_dir: the folder, created if missing; it must be new or empty unless ``overwrite``
            (:func:`check_export_dir`).
        name: the model card's title (default: the folder name).
        training: what the card reports on training, any of ``global_step``, ``epoch``, ``checkpoint``, ``config``
            (the run's LightningCLI config as a dict: data, optimizer, trainer).
        metrics: ``*.metrics.*.json`` files written by ``ddpm test``, summarised in the card.
        overwrite: write into a non-empty folder (an earlier export, say), replacing only :data:`EXPORT_FILES`.

    Returns:
        ``out_dir`` as a Path.
    """
    out = check_export_dir(out_dir, overwrite)
    unet_cfg = unet2d_config(module.net)  # raises before anything is written
    sched_cfg = scheduler_config(module)
    weights = to_diffusers(module.net.state_dict(), weight_table(module.net))
    try:
        (out / "unet").mkdir(parents=True, exist_ok=True)
        (out / "scheduler").mkdir(exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write out_dir {str(out)!r}: {err.strerror or err}") from None
    save_file(weights, str(out / "unet" / WEIGHTS_NAME), metadata={"format": "pt"})
    _write_json(out / "unet" / "config.json", unet_cfg)
    _write_json(out / "scheduler" / "scheduler_config.json", sched_cfg)
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION}
    _write_json(
        out / "model_index.json",
        {**index, "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]},
    )
    summaries = [json.loads(Path(p).read_text()) | {"file": Path(p).name} for p in metrics]
    card = model_card(
        module, unet_cfg, sched_cfg, name=name or out.resolve().name, training=training or {}, metrics=summaries
    )
    (out / "README.md").write_text(card)
    return out


def _run_config(ckpt: Path) -> dict[str, Any] | None:
    """The LightningCLI ``config.yaml`` of the run that wrote ``ckpt`` (``version_N/checkpoints/x.ckpt``), if any."""
    import yaml

    for folder in (ckpt.parent, ckpt.parent.parent):
        if (folder / "config.yaml").is_file():
            return yaml.safe_load((folder / "config.yaml").read_text())
    return None


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Export a training checkpoint (its ``state_dict``: the EMA weights when the EMA callback ran) to ``out_dir``.

    The card reports the checkpoint's step and epoch, the run's ``config.yaml`` when it lies beside the checkpoint
    or one folder up, and the ``<checkpoint stem>.metrics.*.json`` files beside it. A missing, truncated or unsafe
    file, or an ``out_dir`` it may not write (:func:`check_export_dir`), gives a one-line error.
    """
    check_export_dir(out_dir, overwrite)  # before the checkpoint is read
    ckpt = Path(ckpt_path)
    module = DiffusionModule.from_checkpoint(ckpt, "cpu")  # one-line errors for a missing, corrupt or unsafe file
    raw = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)  # the step counters; no copy
    training = {"global_step": raw.get("global_step"), "epoch": raw.get("epoch"), "checkpoint": ckpt.name}
    training["config"] = _run_config(ckpt)
    metrics = sorted(ckpt.parent.glob(f"{ckpt.stem}.metrics.*.json"))
    return export_diffusers(module, out_dir, training=training, metrics=metrics, overwrite=overwrite)
