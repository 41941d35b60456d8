"""The model card (``README.md``) of an exported diffusers folder: recipe, data, training, metrics, how to sample."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ddpm_lightning.nn.unet import SHAPE_OPTIONS

if TYPE_CHECKING:
    from ddpm_lightning.module import DiffusionModule

#: hyperparameters of DiffusionModule shown in the card's recipe table, in this order
RECIPE_KEYS = (
    *SHAPE_OPTIONS,
    "schedule",
    "schedule_params",
    "num_timesteps",
    "prediction_type",
    "min_snr_gamma",
    "cond_drop_prob",
    "warmup_steps",
)

_UNCONDITIONAL = """\
```python
import torch
from diffusers import DDPMPipeline

pipe = DDPMPipeline.from_pretrained("{path}")
# all {T} ancestral steps: the sampler the model was trained for (fewer steps run faster, lower quality)
image = pipe(num_inference_steps={T}, generator=torch.Generator().manual_seed(0)).images[0]
image.save("sample.png")
```

Faster, deterministic DDIM sampling (Song et al. 2021) with the same weights:

```python
from diffusers import DDIMPipeline

pipe = DDIMPipeline.from_pretrained("{path}")  # converts the DDPMScheduler into a DDIMScheduler
image = pipe(num_inference_steps=50, eta=0.0, use_clipped_model_output=True).images[0]
```
"""

_CONDITIONAL = """\
This model is class-conditional, and `DDPMPipeline` passes no labels: sample with the U-Net and a scheduler.
The class embedding has {rows} rows: labels `0..{last}` are the classes, `{null}` (the last index) is the null
label the model was trained with for classifier-free guidance (Ho & Salimans 2022).

```python
import torch
from diffusers import DDIMScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("{path}", subfolder="unet").eval()
scheduler = DDIMScheduler.from_pretrained("{path}", subfolder="scheduler")
scheduler.set_timesteps(50)
labels = torch.tensor([0, 1, 2, 3])       # the classes to draw
null = torch.full_like(labels, {null})      # the null label
w = 3.0                                   # guidance scale: uncond + w (cond - uncond); 1 = plain conditional
x = torch.randn(len(labels), {C}, {H}, {H}, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    for t in scheduler.timesteps:
        out = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
        cond, uncond = out.chunk(2)
        x = scheduler.step(uncond + w * (cond - uncond), t, x, use_clipped_model_output=True).prev_sample
images = (x.clamp(-1, 1) + 1) / 2         # (N, {C}, {H}, {H}) in [0, 1]
```
"""


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`" if value not in (None, "") else "-"


def _recipe(module: DiffusionModule) -> list[str]:
    hp = module.hparams
    rows = ["| hyperparameter | value |", "| --- | --- |"]
    rows += [f"| image | {hp.in_channels} x {hp.image_size} x {hp.image_size} |"]
    if hp.conditional:
        rows += [f"| classes | {hp.num_classes} (+ null label {hp.num_classes}) |"]
    rows += [f"| {k} | {_format(hp[k])} |" for k in RECIPE_KEYS if k in hp]
    rows += [f"| parameters | {sum(p.numel() for p in module.net.parameters()):,} |"]
    return rows


def _training(training: dict[str, Any]) -> list[str]:
    lines = []
    if training.get("global_step") is not None:
        lines.append(f"- optimizer steps: {training['global_step']:,} (epoch {training.get('epoch')})")
    if training.get("checkpoint"):
        lines.append(f"- checkpoint: `{training['checkpoint']}` (its `state_dict`: the EMA weights when EMA ran)")
    config = training.get("config") or {}
    data = config.get("data") or {}
    if data:
        args = {k: v for k, v in (data.get("init_args") or {}).items() if k not in ("root", "download")}
        lines.append(f"- data: `{data.get('class_path', '?')}` with {_inline(args)}")
    model = config.get("model") or {}
    if model.get("optimizer"):
        opt = model["optimizer"]
        lines.append(f"- optimizer: `{opt.get('class_path', opt)}` {_inline(opt.get('init_args') or {})}")
    trainer = config.get("trainer") or {}
    for cb in trainer.get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith(".EMA"):
            lines.append(f"- EMA: {_inline(cb.get('init_args') or {})}")
    keep = ("max_steps", "max_epochs", "precision", "gradient_clip_val", "accumulate_grad_batches", "devices")
    if any(k in trainer for k in keep):
        lines.append(f"- trainer: {_inline({k: trainer[k] for k in keep if k in trainer})}")
    return lines or ["- not recorded (exported from a module, not from a checkpoint of a `ddpm fit` run)"]


def _inline(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in args.items()) or "defaults"


def _metrics(metrics: list[dict[str, Any]]) -> list[str]:
    if not metrics:
        return ["No `ddpm test` metrics were found beside the checkpoint."]
    rows = ["| file | sampler | steps | guidance | samples | results |", "| --- | --- | --- | --- | --- | --- |"]
    for m in metrics:
        s, r = m.get("settings", {}), m.get("results", {})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in r.items() if not k.endswith("seconds") and "seconds" not in k)
        guidance = s.get("guidance_scale")
        if s.get("guidance_interval"):  # guided only at noise levels sigma in (lo, hi]
            guidance = f"{guidance} at sigma in ({s['guidance_interval'][0]:g}, {s['guidance_interval'][1]:g}]"
        rows.append(
            f"| `{m['file']}` | {s.get('sampler')} | {s.get('num_steps')} | {guidance} | "
            f"{s.get('num_samples')} | {shown} |"
        )
    return rows


def model_card(
    module: DiffusionModule,
    unet_cfg: dict[str, Any],
    sched_cfg: dict[str, Any],
    *,
    name: str,
    training: dict[str, Any],
    metrics: list[dict[str, Any]],
) -> str:
    """The README.md text; ``metrics`` are parsed ``*.metrics.*.json`` payloads with their ``file`` name added."""
    hp = module.hparams
    tags = ["pytorch", "diffusers", "denoising-diffusion", "ddpm-lightning"]
    tags.append("class-conditional-image-generation" if hp.conditional else "unconditional-image-generation")
    schedule = sched_cfg["beta_schedule"] if sched_cfg["trained_betas"] is None else "trained_betas (written out)"
    values = dict(path=".", T=sched_cfg["num_train_timesteps"], C=hp.in_channels, H=hp.image_size)
    if hp.conditional:
        values.update(rows=hp.num_classes + 1, last=hp.num_classes - 1, null=hp.num_classes)
    usage = (_CONDITIONAL if hp.conditional else _UNCONDITIONAL).format(**values)
    lines = [
        "---",
        "library_name: diffusers",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {name}",
        "",
        "A DDPM (Ho et al. 2020) trained with ddpm-lightning, exported to diffusers' layout: "
        f"`unet/` is a `UNet2DModel`, `scheduler/` a `DDPMScheduler` ({schedule} betas, T = {values['T']}, "
        f"prediction type `{sched_cfg['prediction_type']}`, x0 clipped to [-1, 1]). Images are in [-1, 1].",
        "",
        "## Recipe",
        "",
        *_recipe(module),
        "",
        "## Training",
        "",
        *_training(training),
        "",
        "## Metrics",
        "",
        *_metrics(metrics),
        "",
        "## Sampling with diffusers",
        "",
        "Replace `.` with this folder's path or Hub id.",
        "",
        usage,
    ]
    return "\n".join(lines)
