"""``ddpm demo``: a Gradio page over a checkpoint, for generating images without code.

    pip install -e ".[demo]"
    ddpm demo --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt      # then open http://127.0.0.1:7860

The page picks the class (conditional models), sampler and steps, guidance scale, seed and batch size; it shows the
sample grid and the denoising trajectory (noise on the left, the sample on the right) and offers the PNGs as a zip.
The same settings and seed give the same images (the noise comes from a seeded ``torch.Generator``).

Safe defaults: the server listens on 127.0.0.1 only (``--host 0.0.0.0`` serves other machines too), makes no share
link and sends no telemetry; the checkpoint is loaded with ``weights_only=True`` (tensors and plain values, never
code). Requests outside the limits (batch above ``--max_batch``, steps outside the sampler's own range: [1, T], or
[1, T - 1] for a multistep solver on "uniform" spacing, which the steps slider follows; guidance outside
:data:`GUIDANCE_RANGE`, a negative seed) are refused with a message; one generation runs at a time and at most
:data:`QUEUE_SIZE` wait behind it, so a burst of clicks cannot pile up work on the server.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ddpm_lightning.images import grid, to_hwc, trajectory_strip
from ddpm_lightning.module import DiffusionModule
from ddpm_lightning.sampling import SAMPLERS, SamplingConfig, choice_error

if TYPE_CHECKING:
    import gradio as gr

DEFAULT_HOST = "127.0.0.1"  # loopback only: listening wider is an explicit choice (--host)
DEFAULT_PORT = 7860  # gradio's usual port
DEFAULT_MAX_BATCH = 64
#: classifier-free guidance scales allowed; 1 is plain conditional sampling, 0 unconditional. Ho & Salimans (2022)
#: sweep up to w = 4 (scale 5 here); past ~10 images only saturate.
GUIDANCE_RANGE = (0.0, 10.0)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed
QUEUE_SIZE = 8  # requests that may wait behind the running one; more are refused by gradio ("queue is full")
TRAJECTORY_ROWS, TRAJECTORY_FRAMES = 4, 10  # the strip shows the first 4 images at 10 evenly spaced steps
#: the trajectory holds every step of the whole batch, (steps + 1, N, C, H, W) float32: above this it is skipped
MAX_TRAJECTORY_BYTES = 1 << 30
ALL_CLASSES = "all"  # label choice that cycles 0, 1, ..., K-1 over the batch
#: tiny images (28x28 digits) scaled up to the column's width, and crisp (no smoothing) when scaled
CSS = """
#grid .image-frame, #trajectory .image-frame { width: 100%; justify-content: center; padding-top: 2.2em; }
#grid img, #trajectory img { height: auto; max-height: none; object-fit: contain; image-rendering: pixelated; }
#grid img { width: min(100%, 480px); }
#trajectory img { width: 100%; }
"""


class DemoError(Exception):
    """A request or a command line the demo refuses; the message says why."""


# -- generation (no gradio) --------------------------------------------------------------------------------------------
def check_request(
    model: DiffusionModule,
    sampler: str,
    num_steps: int,
    guidance_scale: float,
    seed: int,
    batch_size: int,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> None:
    """Raise :class:`DemoError` naming the first setting outside the limits."""
    num_timesteps = model.diffusion.num_timesteps
    if sampler not in SAMPLERS:
        raise DemoError(str(choice_error("sampler", sampler, list(SAMPLERS))))
    if not _is_int(batch_size) or not 1 <= batch_size <= max_batch:
        raise DemoError(f"batch size must be an integer in [1, {max_batch}], got {batch_size!r}")
    high = steps_limit(model, sampler)
    if not _is_int(num_steps) or not 1 <= num_steps <= high:
        raise DemoError(
            f"steps must be an integer in [1, {high}] for {sampler} on this model (T = {num_timesteps}), "
            f"got {num_steps!r}"
        )
    low, high = GUIDANCE_RANGE
    if not isinstance(guidance_scale, (int, float)) or not low <= guidance_scale <= high:
        raise DemoError(f"guidance scale must be in [{low:g}, {high:g}], got {guidance_scale!r}")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise DemoError(f"seed must be an integer in [0, 2^63 - 1], got {seed!r}")


def sampling_for(model: DiffusionModule, sampler: str, **changes: Any) -> SamplingConfig:
    """The model's own sampling settings with ``sampler`` (and ``changes``); a spacing is kept only for a sampler
    that uses one (the solvers), so that picking DDIM on a model whose recipe sets a spacing still works."""
    spacing = model.sampling.spacing if SAMPLERS[sampler].uses_spacing else None
    return model.sampling.replace(sampler=sampler, spacing=spacing, **changes)


def steps_limit(model: DiffusionModule, sampler: str) -> int:
    """The most steps ``sampler`` takes on this model: T, but T - 1 for a multistep solver on "uniform" spacing."""
    return sampling_for(model, sampler).max_steps(model.diffusion.num_timesteps)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def batch_labels(model: DiffusionModule, label: str, batch_size: int) -> Tensor | None:
    """Labels (N,) for a conditional model: one class, or ``all`` classes in turn; None for an unconditional one."""
    if not model.conditional:
        return None
    num_classes = model.hparams.num_classes
    if label == ALL_CLASSES:
        return torch.arange(batch_size) % num_classes
    if not str(label).isdigit() or not 0 <= int(label) < num_classes:
        raise DemoError(f"class must be {ALL_CLASSES!r} or an integer in [0, {num_classes - 1}], got {label!r}")
    return torch.full((batch_size,), int(label), dtype=torch.long)


def generate(
    model: DiffusionModule, label: str, sampler: str, num_steps: int, guidance_scale: float, seed: int, batch_size: int
) -> tuple[Tensor, Tensor | None]:
    """Sample a batch; returns images (N, C, H, W) in [-1, 1] and the trajectory strip (rows * frames, C, H, W) or
    None when the batch's trajectory would exceed :data:`MAX_TRAJECTORY_BYTES`. Deterministic given ``seed``."""
    hp = model.hparams
    labels = batch_labels(model, label, int(batch_size))
    config = sampling_for(model, sampler, num_steps=int(num_steps), guidance_scale=float(guidance_scale))
    steps = config.steps(model.diffusion.num_timesteps)  # DDPM runs all T steps
    want_trajectory = (steps + 1) * batch_size * hp.in_channels * hp.image_size**2 * 4 <= MAX_TRAJECTORY_BYTES
    gen = torch.Generator(device=model.device).manual_seed(int(seed))
    out = model.sample(
        int(batch_size), labels=labels, sampling=config, generator=gen, return_trajectory=want_trajectory
    )
    if not want_trajectory:
        return out.float().cpu(), None
    images, trajectory = out
    rows = min(TRAJECTORY_ROWS, int(batch_size))
    return images.float().cpu(), trajectory_strip(trajectory.float().cpu(), rows, TRAJECTORY_FRAMES)


def to_uint8_grid(images: Tensor, nrow: int) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (H', W', 3) uint8 grid with white 2-pixel gutters."""
    return to_hwc(grid(images, nrow))


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_zip(path: Path, images: Tensor, grid: np.ndarray, strip: np.ndarray | None, settings: dict) -> Path:
    """Zip of ``sample_NNN.png`` (one per image, native size), ``grid.png``, ``trajectory.png`` and the settings."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, image in enumerate(images):
            zf.writestr(f"sample_{i:03d}.png", _png_bytes(to_hwc(image)))
        zf.writestr("grid.png", _png_bytes(grid))
        if strip is not None:
            zf.writestr("trajectory.png", _png_bytes(strip))
        zf.writestr("settings.json", json.dumps(settings, indent=2))
    return path


# -- the page ----------------------------------------------------------------------------------------------------------
def build_app(model: DiffusionModule, out_dir: Path, max_batch: int = DEFAULT_MAX_BATCH) -> gr.Blocks:
    """The Gradio page; its ``generate`` endpoint (``api_name="generate"``) takes (class, sampler, steps, guidance,
    seed, batch size) and returns (grid, trajectory strip, zip of PNGs). Zips are written to ``out_dir``."""
    import gradio as gr

    hp = model.hparams
    kind = f"conditional, {hp.num_classes} classes" if model.conditional else "unconditional"
    with gr.Blocks(title="ddpm-lightning demo", analytics_enabled=False) as app:
        gr.Markdown(
            f"## ddpm-lightning demo\n{hp.in_channels}x{hp.image_size}x{hp.image_size} images, {kind}, "
            f"T = {model.diffusion.num_timesteps}, {hp.schedule} schedule, EMA weights. "
            "Same settings and seed, same images."
        )
        with gr.Row():
            with gr.Column(scale=1):
                inputs = _settings(gr, model, max_batch)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                outputs = [
                    gr.Image(label="samples", format="png", interactive=False, elem_id="grid"),
                    gr.Image(label="denoising: noise -> image", format="png", interactive=False, elem_id="trajectory"),
                    gr.File(label="PNGs (zip)", interactive=False, elem_id="download"),
                ]

        def on_generate(*settings):
            try:
                grid, strip, zip_path = _respond(model, out_dir, max_batch, *settings)
            except DemoError as err:
                raise gr.Error(str(err)) from None
            if strip is None:
                gr.Warning("trajectory not shown: it would hold too many intermediate images; lower steps or batch")
            return grid, strip, zip_path

        button.click(on_generate, inputs, outputs, api_name="generate")
        sampler, steps = inputs[1], inputs[2]
        for event in (sampler.change, app.load):  # the steps slider spans the chosen sampler's own range
            event(lambda name, value: steps_slider_update(gr, model, name, value), [sampler, steps], steps)
    app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return app


def _settings(gr: Any, model: DiffusionModule, max_batch: int) -> list:
    """The input components, in the order of the ``generate`` endpoint's arguments."""
    num_classes = model.hparams.num_classes
    default = model.sampling  # the recipe's model.sampling: the page opens on the setting the recipe chose
    choices = [("all classes in turn", ALL_CLASSES)] + [(str(k), str(k)) for k in range(num_classes)]
    return [
        gr.Dropdown(choices, value=ALL_CLASSES, label="class", visible=model.conditional, elem_id="label"),
        gr.Radio(list(SAMPLERS), value=default.sampler, label="sampler", elem_id="sampler"),
        gr.Slider(
            1,
            max(steps_limit(model, name) for name in SAMPLERS),  # the page narrows it to the chosen sampler's
            value=min(default.num_steps, steps_limit(model, default.sampler)),
            step=1,
            label="steps",
            info=_steps_info(model, default.sampler),
            elem_id="steps",
        ),
        gr.Slider(
            *GUIDANCE_RANGE,
            value=min(max(default.guidance_scale, GUIDANCE_RANGE[0]), GUIDANCE_RANGE[1]),
            step=0.5,
            label="guidance scale",
            info="1 = plain conditional, 0 = unconditional",
            visible=model.conditional,
            elem_id="guidance",
        ),
        gr.Number(0, precision=0, minimum=0, label="seed", elem_id="seed"),
        gr.Slider(1, max_batch, value=min(16, max_batch), step=1, label="batch size", elem_id="batch"),
    ]


def _steps_info(model: DiffusionModule, sampler: str) -> str:
    T = model.diffusion.num_timesteps
    if not SAMPLERS[sampler].uses_steps:
        return f"DDPM always runs all T = {T} steps"
    return f"sampling steps: 1 to {steps_limit(model, sampler)} for {sampler} (T = {T})"


def steps_slider_update(gr: Any, model: DiffusionModule, sampler: str, value: float) -> Any:
    """The steps slider for ``sampler``: its maximum the sampler's own limit, the value clipped to it."""
    if sampler not in SAMPLERS:
        return gr.Slider()  # unchanged; the request is refused with its own message
    high = steps_limit(model, sampler)
    return gr.Slider(maximum=high, value=min(max(int(value), 1), high), info=_steps_info(model, sampler))


def _respond(
    model: DiffusionModule,
    out_dir: Path,
    max_batch: int,
    label: str,
    sampler: str,
    num_steps: float,
    guidance_scale: float,
    seed: float,
    batch_size: float,
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Check, generate, and write the zip; returns the page's three outputs."""
    check_request(model, sampler, num_steps, guidance_scale, seed, batch_size, max_batch)
    num_steps, seed, batch_size = int(num_steps), int(seed), int(batch_size)
    images, strip = generate(model, label, sampler, num_steps, guidance_scale, seed, batch_size)
    grid = to_uint8_grid(images, nrow=math.ceil(math.sqrt(batch_size)))
    strip_png = None
    if strip is not None:
        strip_png = to_uint8_grid(strip, nrow=strip.shape[0] // min(TRAJECTORY_ROWS, batch_size))
    steps_run = SamplingConfig(sampler=sampler, num_steps=num_steps).steps(model.diffusion.num_timesteps)
    settings = {"sampler": sampler, "steps": steps_run, "seed": seed, "batch_size": batch_size}
    if model.conditional:
        settings |= {"class": label, "guidance_scale": guidance_scale}
    conditioning = f"_class-{label}_w{guidance_scale:g}" if model.conditional else ""
    name = f"ddpm_seed{seed}_{sampler}{steps_run}{conditioning}_n{batch_size}.zip"  # label is "all" or digits
    return grid, strip_png, str(write_zip(out_dir / name, images, grid, strip_png, settings))


# -- serving (the command line is ddpm_lightning.commands.demo) -----------------------------------------------------
def serve(app: gr.Blocks, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True) -> None:
    """Start the server on ``host:port``, with no share link; ``block=False`` returns once it is up (tests)."""
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=not block, css=CSS)
