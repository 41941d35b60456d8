"""``ddpm demo --ckpt_path CKPT``: serve the web page of :mod:`ddpm_lightning.demo` (needs the ``demo`` extra)."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from ddpm_lightning.demo import DEFAULT_HOST, DEFAULT_MAX_BATCH, DEFAULT_PORT

DESCRIPTION = "A web page that samples from a checkpoint (gradio; pip install -e '.[demo]')."


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint written by `ddpm fit` (EMA weights)")
    parser.add_argument(
        "--host", type=str, default=DEFAULT_HOST, help="address to listen on (0.0.0.0 serves anyone who can reach it)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--device", type=str, default="auto", help="torch device; auto = cuda if available, else cpu")
    parser.add_argument("--max_batch", type=int, default=DEFAULT_MAX_BATCH, help="largest batch a request may ask")


def run(cfg: Namespace) -> None:
    if not 0 <= cfg.port <= 65535 or cfg.max_batch < 1:
        raise ValueError("--port must be in [0, 65535] and --max_batch >= 1 (see `ddpm demo --help`)")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check on start
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the page needs nothing from the Hugging Face hub
    if importlib.util.find_spec("gradio") is None:  # checked without importing it (seconds)
        raise ValueError("the demo needs gradio: pip install -e '.[demo]'")
    from ddpm_lightning.demo import build_app, serve
    from ddpm_lightning.module import DiffusionModule

    model = DiffusionModule.from_checkpoint(cfg.ckpt_path, cfg.device)
    with tempfile.TemporaryDirectory(prefix="ddpm-demo-") as out_dir:
        serve(build_app(model, Path(out_dir), cfg.max_batch), cfg.host, cfg.port)
