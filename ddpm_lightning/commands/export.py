"""``ddpm export --ckpt_path CKPT --out_dir DIR``: a checkpoint's EMA weights as a diffusers folder (and model card).

    ddpm export --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --out_dir exported/mnist
    python -c "from diffusers import DDPMPipeline; DDPMPipeline.from_pretrained('exported/mnist')"   # no ddpm_lightning

See :mod:`ddpm_lightning.hub` for what the folder holds.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

DESCRIPTION = "Write a checkpoint as a diffusers folder: unet/, scheduler/, model_index.json and a model card."


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint written by `ddpm fit`")
    parser.add_argument("--out_dir", type=str, required=True, help="the folder to write (DDPMPipeline.from_pretrained)")
    parser.add_argument(
        "--overwrite",
        type=bool,
        default=False,
        help="write into a non-empty out_dir (an earlier export): only the export's own files are replaced",
    )


def run(cfg: Namespace) -> Path:
    from ddpm_lightning.hub import export_checkpoint

    out = export_checkpoint(cfg.ckpt_path, cfg.out_dir, overwrite=cfg.overwrite)
    print(f"wrote {out} (load with diffusers: DDPMPipeline.from_pretrained({str(out)!r}); see {out / 'README.md'})")
    return out
