"""Read a diffusers UNet2DModel folder into our U-Net: ``model.init_from`` (:mod:`ddpm_lightning.hub` writes one).

The folder is checked before a weight is copied: its config's architecture fields, then every tensor's name and
shape, must be the network's, and the first difference is a one-line ValueError. Only safetensors are read: a
pickled ``.bin`` can run code when loaded. The U-Net itself never reads files; the module hands it these weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from ddpm_lightning.nn import UNet
from ddpm_lightning.nn.diffusers_layout import (
    WeightEntry,
    expected_shapes,
    first_config_mismatch,
    from_diffusers,
    rename_legacy_attention,
    unet2d_config,
    weight_table,
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
#: weight files diffusers may hold that are pickles (refused) rather than safetensors
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def find_unet_folder(path: str | Path) -> Path:
    """The folder holding the UNet2DModel's ``config.json``: ``path/unet`` (a pipeline folder) or ``path``."""
    root = Path(path)
    for folder in (root / "unet", root):
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(
        f"no diffusers UNet2DModel in {str(root)!r}: found neither unet/config.json nor config.json"
    )


def _read_weights(folder: Path) -> dict[str, Tensor]:
    if (folder / WEIGHTS_NAME).is_file():
        return load_file(str(folder / WEIGHTS_NAME))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"refusing to load {pickles[0]!r} in {str(folder)!r}: pickled weights can run code, only {WEIGHTS_NAME} "
            "is read (convert once where you trust the file: diffusers' UNet2DModel.from_pretrained(folder)"
            ".save_pretrained(folder))"
        )
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {str(folder)!r}")


def _first_tensor_mismatch(net: UNet, weights: dict[str, Tensor], table: list[WeightEntry]) -> str | None:
    expected = expected_shapes(net, table)
    for name, shape in expected.items():
        if name not in weights:
            return f"tensor {name} is missing from the folder"
        if tuple(weights[name].shape) != shape:
            return f"tensor {name}: folder has shape {tuple(weights[name].shape)}, our U-Net needs {shape}"
    extra = sorted(set(weights) - set(expected))
    return f"tensor {extra[0]} in the folder has no place in our U-Net" if extra else None


def load_diffusers_unet(path: str | Path, net: UNet) -> UNet:
    """Copy the weights of a diffusers UNet2DModel folder into ``net`` (in place) and return ``net``.

    ``path`` is a UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or a pipeline folder with
    ``unet/``. The config's architecture fields, then every tensor's name and shape, must be ``net``'s; the first
    difference is a one-line ValueError. Old diffusers attention names (``query``, ``proj_attn``, ...) are accepted.
    """
    folder = find_unet_folder(path)
    found = json.loads((folder / "config.json").read_text())
    if (mismatch := first_config_mismatch(unet2d_config(net), found)) is None:
        weights = rename_legacy_attention(_read_weights(folder))
        table = weight_table(net)
        if (mismatch := _first_tensor_mismatch(net, weights, table)) is None:
            net.load_state_dict(from_diffusers(weights, table, net))
            return net
    raise ValueError(f"cannot load {str(folder)!r} into this U-Net: {mismatch}")
