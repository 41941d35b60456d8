"""Our :class:`~ddpm_lightning.nn.UNet` in diffusers' ``UNet2DModel`` terms: its config, and one weight-name table.

Both networks are the DDPM U-Net, block for block, so the mapping is a renaming with two reshapes:

* our attention computes q, k, v with one 1x1 conv ``qkv`` ((3C, C, 1, 1), rows ``[q; k; v]``, head ``h`` in
  channels ``h*hd : (h+1)*hd`` of each) where diffusers has three ``Linear(C, C)`` ``to_q`` / ``to_k`` / ``to_v``
  with heads in the same channel order, and our 1x1 ``proj`` is its ``to_out.0`` Linear;
* everything else (ResBlocks, up/down convolutions, GroupNorms, time and class embeddings) keeps its shape.

The table is written once, by :func:`weight_table`, and read both ways (:func:`to_diffusers`, :func:`from_diffusers`).
This module never imports diffusers: the defaults below are those of diffusers 0.42's ``UNet2DModel.__init__``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ddpm_lightning.nn.layers import AttentionBlock, Downsample, EmbedSequential, ResBlock, Upsample
from ddpm_lightning.nn.unet import EMB_MULT, UNet, level_resolutions

#: the diffusers release whose UNet2DModel / DDPMScheduler / DDPMPipeline this layout was checked against
DIFFUSERS_VERSION = "0.42.1"

#: UNet2DModel's default for every config field we compare (a folder's config.json may omit any of them)
UNET2D_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "add_attention": True,
    "attention_head_dim": 8,
    "attn_norm_num_groups": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "center_input_sample": False,
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",
    "mid_block_scale_factor": 1,
    "class_embed_type": None,
    "num_class_embeds": None,
}

#: diffusers' ``downsample_padding`` per :data:`~ddpm_lightning.nn.layers.DownsamplePadding` (0 pads bottom/right)
DOWNSAMPLE_PADDING = {"symmetric": 1, "bottom_right": 0}

_RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2"}
_RES_NAMES["skip"] = "conv_shortcut"  # DDPM's "nin" 1x1 shortcut, where the width changes

#: tensor names of diffusers' attention before 0.14 (e.g. google/ddpm-cifar10-32's files) -> today's
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


@dataclass(frozen=True)
class WeightEntry:
    """One diffusers tensor: ``theirs = ours[rows]``, flattened to 2-D when ``linear`` (1x1 conv -> Linear)."""

    ours: str
    theirs: str
    rows: slice | None = None
    linear: bool = False


def _attention_heads(net: UNet, width: int) -> int:
    opts = net.options
    return width // opts["attention_head_dim"] if opts["attention_head_dim"] else opts["num_heads"]


def _diffusers_head_dim(net: UNet, attended_widths: list[int]) -> int | None:
    """UNet2DModel's one ``attention_head_dim`` for our heads (None: one head as wide as its block)."""
    head_dims = {w // _attention_heads(net, w) for w in attended_widths}
    if all(_attention_heads(net, w) == 1 for w in attended_widths):
        return None
    if len(head_dims) != 1:
        raise ValueError(
            f"num_heads={net.options['num_heads']} gives attention heads of {sorted(head_dims)} channels, but "
            "diffusers' UNet2DModel has one attention_head_dim for all levels; set attention_head_dim instead"
        )
    return head_dims.pop()


def unet2d_config(net: UNet) -> dict[str, Any]:
    """The ``UNet2DModel`` config (``unet/config.json``) of ``net``; ValueError naming an option it cannot express."""
    o = net.options
    if o["channel_mults"][0] != 1:
        raise ValueError(
            f"channel_mults[0]={o['channel_mults'][0]} cannot be exported: diffusers' UNet2DModel sizes conv_in and "
            "the time embedding by the first level's width, ours by base_channels; use channel_mults[0] = 1"
        )
    widths = [o["base_channels"] * m for m in o["channel_mults"]]
    attends = [r in o["attention_resolutions"] for r in level_resolutions(net.image_size, o["channel_mults"])]
    attended = [w for w, a in zip(widths, attends) if a] + [widths[-1]]  # the middle block always attends
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        **UNET2D_DEFAULTS,
        "sample_size": net.image_size,
        "in_channels": net.in_channels,
        "out_channels": net.out_channels,
        "block_out_channels": widths,
        "layers_per_block": o["num_res_blocks"],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "attention_head_dim": _diffusers_head_dim(net, attended),
        "norm_num_groups": o["num_groups"],
        "norm_eps": o["norm_eps"],
        "downsample_padding": DOWNSAMPLE_PADDING[o["downsample_padding"]],
        "freq_shift": o["time_freq_shift"],
        "flip_sin_to_cos": o["time_flip_sin_to_cos"],
        "dropout": o["dropout"],
        # one row per class plus our null label (index num_classes), added to the time embedding as diffusers does
        "num_class_embeds": None if net.num_classes is None else net.num_classes + 1,
    }


def _normalized(config: dict[str, Any]) -> dict[str, Any]:
    """A config with diffusers' defaults filled in and equivalent spellings made equal (lists, None widths)."""
    cfg = {**UNET2D_DEFAULTS, **config}
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    widths = cfg["block_out_channels"]
    if cfg["time_embedding_dim"] is None:
        cfg["time_embedding_dim"] = EMB_MULT * widths[0]
    if cfg["attn_norm_num_groups"] is None:
        cfg["attn_norm_num_groups"] = cfg["norm_num_groups"]
    # attention_head_dim None means one head per block; compare the heads of every attending block instead
    head_dim = cfg["attention_head_dim"]
    attended = [w for w, kind in zip(widths, cfg["down_block_types"]) if kind.startswith("Attn")] + widths[-1:]
    cfg["attention_head_dim"] = [w // (head_dim or w) for w in attended]
    return cfg


def first_config_mismatch(expected: dict[str, Any], found: dict[str, Any]) -> str | None:
    """``"field: folder has X, our U-Net needs Y"`` for the first architecture field that differs, else None.

    ``sample_size`` (convolutions run at any size) and ``dropout`` (training only) are not compared.
    """
    if found.get("_class_name", "UNet2DModel") != "UNet2DModel":
        return f"_class_name: folder has {found['_class_name']!r}, our U-Net needs 'UNet2DModel'"
    want, have = _normalized(expected), _normalized(found)
    for key in UNET2D_DEFAULTS:
        if want[key] != have[key]:
            label = "attention heads per attending block" if key == "attention_head_dim" else key
            return f"{label}: folder has {have[key]!r}, our U-Net needs {want[key]!r}"
    return None


def _module_entries(module: nn.Module, ours: str, theirs: str) -> list[WeightEntry]:
    """The entries of one ResBlock / AttentionBlock / Up- or Downsample at prefixes ``ours`` and ``theirs``."""
    if isinstance(module, ResBlock):
        names = {n: f"{_RES_NAMES[n.split('.')[0]]}.{n.split('.')[1]}" for n, _ in module.named_parameters()}
        return [WeightEntry(f"{ours}.{n}", f"{theirs}.{t}") for n, t in names.items()]
    if isinstance(module, AttentionBlock):
        c = module.proj.out_channels
        entries = [WeightEntry(f"{ours}.norm.{p}", f"{theirs}.group_norm.{p}") for p in ("weight", "bias")]
        for i, part in enumerate(("to_q", "to_k", "to_v")):  # rows [q; k; v] of our qkv conv
            rows = slice(i * c, (i + 1) * c)
            entries += [
                WeightEntry(f"{ours}.qkv.{p}", f"{theirs}.{part}.{p}", rows, linear=True) for p in ("weight", "bias")
            ]
        return entries + [
            WeightEntry(f"{ours}.proj.{p}", f"{theirs}.to_out.0.{p}", linear=True) for p in ("weight", "bias")
        ]
    assert isinstance(module, Downsample | Upsample), type(module)
    return [WeightEntry(f"{ours}.conv.{p}", f"{theirs}.conv.{p}") for p in ("weight", "bias")]


def _blocks_entries(blocks: nn.ModuleList, ours: str, theirs: str, sampler: type) -> list[WeightEntry]:
    """Our flat list of blocks -> diffusers' ``{theirs}.{level}.resnets.{j}`` / ``attentions.{j}`` / ``*samplers.0``.

    A level ends with the block holding ``sampler`` (Downsample / Upsample), or at the last block.
    """
    entries: list[WeightEntry] = []
    level, j = 0, 0
    for b, block in enumerate(blocks):
        assert isinstance(block, EmbedSequential)
        for i, layer in enumerate(block):
            if isinstance(layer, ResBlock):
                target = f"{theirs}.{level}.resnets.{j}"
            elif isinstance(layer, AttentionBlock):
                target = f"{theirs}.{level}.attentions.{j}"
            else:
                target = f"{theirs}.{level}.{'downsamplers' if sampler is Downsample else 'upsamplers'}.0"
            entries += _module_entries(layer, f"{ours}.{b}.{i}", target)
        j += 1
        if any(isinstance(layer, sampler) for layer in block):
            level, j = level + 1, 0
    return entries


def weight_table(net: UNet) -> list[WeightEntry]:
    """Every diffusers tensor of ``net``'s UNet2DModel and where it lives in ``net``'s state dict."""
    pairs = [("time_embed.linear1", "time_embedding.linear_1"), ("time_embed.linear2", "time_embedding.linear_2")]
    pairs += [("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out")]
    if net.class_embed is not None:
        pairs.append(("class_embed", "class_embedding"))
    entries = [WeightEntry(f"{a}.{p}", f"{b}.{p}") for a, b in pairs for p in ("weight", "bias")]
    entries = [e for e in entries if not e.ours.startswith("class_embed.bias")]  # an Embedding has no bias
    entries += _blocks_entries(net.down, "down", "down_blocks", Downsample)
    # our middle is (ResBlock, AttentionBlock, ResBlock); diffusers' mid block: resnets 0, 1 and attentions 0
    for i, target in enumerate(("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")):
        entries += _module_entries(net.middle[i], f"middle.{i}", target)
    entries += _blocks_entries(net.up, "up", "up_blocks", Upsample)
    assert {e.ours for e in entries} == set(net.state_dict()), "every parameter of the U-Net is mapped"
    return entries


def _their_shape(ours: torch.Size, entry: WeightEntry) -> tuple[int, ...]:
    shape = list(ours)
    if entry.rows is not None:
        shape[0] = entry.rows.stop - entry.rows.start
    return tuple(shape[:2]) if entry.linear and len(shape) == 4 else tuple(shape)


def expected_shapes(net: UNet, table: list[WeightEntry]) -> dict[str, tuple[int, ...]]:
    """diffusers tensor name -> the shape ``net`` needs there."""
    ours = net.state_dict()
    return {e.theirs: _their_shape(ours[e.ours].shape, e) for e in table}


def to_diffusers(state_dict: dict[str, Tensor], table: list[WeightEntry]) -> dict[str, Tensor]:
    """Our U-Net state dict -> UNet2DModel's (contiguous float copies, as safetensors stores them)."""
    out = {}
    for e in table:
        t = state_dict[e.ours]
        t = t[e.rows] if e.rows is not None else t
        out[e.theirs] = (t.flatten(1) if e.linear and t.ndim == 4 else t).detach().cpu().contiguous().clone()
    return out


def from_diffusers(state_dict: dict[str, Tensor], table: list[WeightEntry], net: UNet) -> dict[str, Tensor]:
    """UNet2DModel's state dict (names and shapes already checked) -> ``net``'s, concatenating q, k, v."""
    parts: dict[str, list[Tensor]] = {}
    ours = net.state_dict()
    for e in table:
        t = state_dict[e.theirs]
        if e.linear and ours[e.ours].ndim == 4:
            t = t[:, :, None, None]  # (O, I) -> (O, I, 1, 1)
        parts.setdefault(e.ours, []).append(t)  # table order: q, k, v rows in turn
    return {name: torch.cat(ts) if len(ts) > 1 else ts[0] for name, ts in parts.items()}


def rename_legacy_attention(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensor names of old diffusers attention blocks (``query``, ``key``, ``value``, ``proj_attn``) -> today's."""
    renamed = {}
    for name, tensor in state_dict.items():
        for old, new in _LEGACY_ATTENTION.items():
            if ".attentions." in name and old in name:
                name = name.replace(old, new)
        renamed[name] = tensor
    return renamed
