"""diffusers export and import: same outputs and samples as diffusers' own classes, offline, one-line errors.

diffusers is a test dependency only: ddpm_lightning.hub writes and reads the folders without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from standins import write_image_folder

from ddpm_lightning.cli import build_cli
from ddpm_lightning.hub import beta_schedule_config, export_checkpoint, export_diffusers
from ddpm_lightning.hub_import import load_diffusers_unet
from ddpm_lightning.main import main
from ddpm_lightning.module import DiffusionModule
from ddpm_lightning.nn import UNet
from ddpm_lightning.samplers import ddim_sample, ddim_timesteps, guided_denoise_fn
from ddpm_lightning.schedules import make_betas

diffusers = pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
FINETUNE = REPO / "configs" / "finetune_ddpm_cifar10.yaml"
#: data-linked sizes of each recipe: (in_channels, image_size, num_classes)
DATA_SIZES = {"mnist": (1, 28, 10), "mnist_conditional": (1, 28, 10), "cifar10": (3, 32, 10)}
#: module arguments that are training-only and not plain values in YAML
NOT_MODEL = ("optimizer", "lr_scheduler")

#: google/ddpm-cifar10-32's config.json (diffusers 0.0.4), as on the Hub (the recipe's model section)
DDPM_CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,  # one head per attention block (diffusers' default, 8 channels a head, is not)
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def recipe_module(config: str, **overrides) -> DiffusionModule:
    """A DiffusionModule with a recipe's ``model`` section, its data-linked sizes, and perturbed weights."""
    model = yaml.safe_load((REPO / "configs" / f"{config}.yaml").read_text())["model"]
    model = {k: v for k, v in model.items() if k not in NOT_MODEL}
    in_channels, image_size, num_classes = DATA_SIZES.get(config, (3, 32, 0))
    module = DiffusionModule(
        in_channels=in_channels, image_size=image_size, num_classes=num_classes, **{**model, **overrides}
    )
    return perturb_(module).eval()


def perturb_(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Move every weight off its initial value: zero-initialised output layers would hide any mapping error."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def max_delta(ours: DiffusionModule, theirs, batch: int = 2) -> float:
    """max |ours - diffusers| on random x, random t and (conditional) random labels including the null label."""
    hp = ours.hparams
    x = torch.randn(batch, hp.in_channels, hp.image_size, hp.image_size)
    t = torch.randint(0, hp.num_timesteps, (batch,))
    y = torch.tensor([3, hp.num_classes])[:batch] if hp.conditional else None
    with torch.no_grad():
        return (ours.net(x, t, y) - theirs(x, t, class_labels=y).sample).abs().max().item()


# -- export -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["mnist", "mnist_conditional", "cifar10"])
def test_exported_unet_gives_our_outputs(config, tmp_path, no_network):
    module = recipe_module(config)
    out = export_diffusers(module, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model_index.json", "scheduler", "unet"]
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in module.net.parameters())
    delta = max_delta(module, unet)
    print(f"{config}: max |delta| {delta:.2e}")  # measured: mnist 3.6e-6, mnist_conditional 3.2e-6, cifar10 1.2e-5
    assert delta <= 1e-4
    index = json.loads((out / "model_index.json").read_text())
    assert (index["_class_name"], index["unet"], index["scheduler"]) == (
        "DDPMPipeline",
        ["diffusers", "UNet2DModel"],
        ["diffusers", "DDPMScheduler"],
    )
    card = (out / "README.md").read_text()
    assert ("class_labels=" in card) == module.conditional and "## Recipe" in card


def card_snippets(folder: Path) -> list[str]:
    """The ```python blocks of an exported model card."""
    card = (folder / "README.md").read_text()
    return [block.split("```")[0] for block in card.split("```python\n")[1:]]


def test_model_card_snippets_run(tmp_path, monkeypatch, no_network):
    """The card's sampling code, as a user copies it (``"."`` is the folder): DDIM unconditional, guided conditional."""
    uncond = export_diffusers(recipe_module("mnist", base_channels=16, num_groups=4), tmp_path / "uncond")
    cond = export_diffusers(recipe_module("mnist_conditional", base_channels=16, num_groups=4), tmp_path / "cond")
    ddpm, ddim = card_snippets(uncond)
    (guided,) = card_snippets(cond)
    assert "num_inference_steps=1000" in ddpm  # 1000 steps: DDPMPipeline itself runs in the subprocess test
    for folder, code in ((uncond, ddim), (cond, guided)):
        monkeypatch.chdir(folder)
        scope: dict = {}
        exec(code.replace("image.save(", "print("), scope)
        if folder == cond:
            assert scope["images"].shape == (4, 1, 28, 28) and torch.isfinite(scope["images"]).all()
        else:
            assert scope["image"].size == (28, 28)


def test_options_diffusers_has_too(tmp_path):
    """The options that only exist for diffusers' layouts (its defaults: cos/sin order, no shift, head width)."""
    module = perturb_(
        DiffusionModule(
            in_channels=3,
            image_size=16,
            base_channels=16,
            channel_mults=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(8,),
            num_groups=4,
            norm_eps=1e-6,
            downsample_padding="bottom_right",
            time_freq_shift=0,
            time_flip_sin_to_cos=True,
            attention_head_dim=8,  # 2 heads at 16 channels, 4 at 32
        )
    ).eval()
    unet = diffusers.UNet2DModel.from_pretrained(export_diffusers(module, tmp_path) / "unet").eval()
    assert unet.config.attention_head_dim == 8 and unet.config.downsample_padding == 0
    assert max_delta(module, unet) <= 1e-4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(channel_mults=(2, 2)), r"^channel_mults\[0\]=2 cannot be exported"),
        (dict(num_heads=2, attention_resolutions=(16,)), r"^num_heads=2 gives attention heads of \[8, 16\] channels"),
    ],
)
def test_unrepresentable_options_are_named(kwargs, match, tmp_path):
    module = DiffusionModule(
        in_channels=1, image_size=16, base_channels=16, num_groups=4, **{"channel_mults": (1, 2), **kwargs}
    )
    with pytest.raises(ValueError, match=match) as err:
        export_diffusers(module, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("schedule", "params", "num_timesteps", "named"),
    [
        ("linear", {}, 1000, "linear"),  # mnist, cifar10
        ("linear", {}, 250, "linear"),  # endpoints rescaled by 1000/T
        ("linear", {}, 10, None),  # clipped at 0.999: no longer a line
        ("cosine", {}, 1000, "squaredcos_cap_v2"),  # mnist_conditional
        ("cosine", {"s": 0.02}, 1000, None),
        ("sigmoid", {}, 1000, None),  # diffusers' "sigmoid" is another schedule (GeoDiff's)
        ("polynomial", {"tau": 2}, 1000, None),
    ],
)
def test_scheduler_betas_are_ours(schedule, params, num_timesteps, named):
    betas = make_betas(schedule, num_timesteps, **params)
    fields = beta_schedule_config(schedule, params, betas)
    assert (fields["beta_schedule"] if fields["trained_betas"] is None else None) == named
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=num_timesteps, **fields)
    # diffusers keeps float32 betas (its "linear" from a float32 linspace): equal to ours within 2 float32 ulps
    torch.testing.assert_close(scheduler.betas.double(), betas, rtol=2.5e-7, atol=0)
    assert (scheduler.alphas_cumprod.double() - torch.cumprod(1 - betas, 0)).abs().max() <= 1e-5


def ddim_diffusers(folder: Path, unet, noise: torch.Tensor, num_steps: int, labels=None, guidance_scale: float = 1.0):
    """DDIM with eta 0 through diffusers' DDIMScheduler from the exported folder, at our timesteps.

    Our DDIM steps are ``linspace(T-1, 0, n)`` rounded, which is diffusers' ``timestep_spacing="linspace"``; but
    diffusers' step always lands on ``t - T // num_inference_steps``. For T = 1000 and 10 steps our gap is
    999 / 9 = 111 = 1000 // 9, so ``num_inference_steps = 9`` (set after ``set_timesteps(10)``) makes every step land
    on our next timestep, and the last (from t = 0) on ``final_alpha_cumprod = 1`` (``set_alpha_to_one``), as ours.
    ``use_clipped_model_output`` re-derives eps from the clipped x0, as our sampler does.
    """
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler", timestep_spacing="linspace")
    scheduler.set_timesteps(num_steps)
    assert scheduler.timesteps.tolist() == ddim_timesteps(scheduler.config.num_train_timesteps, num_steps).tolist()
    gap = int(scheduler.timesteps[0] - scheduler.timesteps[1])
    assert scheduler.config.num_train_timesteps // (num_steps - 1) == gap, "the steps of this test must be even"
    scheduler.num_inference_steps = num_steps - 1
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            if labels is None:
                out = unet(x, t).sample
            else:  # classifier-free guidance, as the model card shows it
                null = torch.full_like(labels, unet.config.num_class_embeds - 1)
                cond, uncond = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x


@pytest.mark.parametrize(
    ("config", "overrides", "guidance_scale"),
    [
        ("mnist", {}, 1.0),
        ("mnist_conditional", {}, 2.0),
        ("mnist", {"prediction_type": "v"}, 1.0),
        ("mnist", {"prediction_type": "x0", "schedule": "sigmoid"}, 1.0),
    ],
    ids=["mnist", "conditional-guided", "v", "x0-trained-betas"],
)
def test_ddim_samples_match_diffusers(config, overrides, guidance_scale, tmp_path):
    module = recipe_module(config, **overrides)
    folder = export_diffusers(module, tmp_path)
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    hp = module.hparams
    noise = torch.randn(2, hp.in_channels, hp.image_size, hp.image_size, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([4, 7]) if module.conditional else None
    if labels is not None:
        denoise = guided_denoise_fn(module.net, labels, guidance_scale, module.net.null_label)
    else:
        denoise = lambda x, t: module.net(x, t)  # noqa: E731
    ours = ddim_sample(denoise, module.diffusion, noise.shape, num_steps=10, eta=0.0, x_T=noise, clip_x0=True)
    theirs = ddim_diffusers(folder, unet, noise, 10, labels, guidance_scale)
    delta = (ours - theirs).abs().max().item()
    print(f"{config} {overrides}: DDIM max |delta| {delta:.2e}")  # measured 2e-6 (v) to 5.1e-5 (mnist)
    assert delta <= 1e-3


def test_ddpm_pipeline_loads_without_ddpm_lightning(tmp_path):
    """A user with diffusers only: `import ddpm_lightning` fails in the subprocess, and nothing is downloaded."""
    module = recipe_module("mnist", base_channels=16, num_groups=4)  # the mnist recipe's shape, narrower
    folder = export_diffusers(module, tmp_path / "model")
    script = f"""
import sys
sys.modules["ddpm_lightning"] = None  # any import of it raises ImportError
try:
    import ddpm_lightning
except ImportError:
    pass
else:
    raise SystemExit("ddpm_lightning is importable")
import numpy as np, torch
from diffusers import DDPMPipeline
pipe = DDPMPipeline.from_pretrained({str(folder)!r})
images = pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
assert images.shape == (1, 28, 28, 1) and np.isfinite(images).all(), images.shape
print("ok", type(pipe.unet).__name__, type(pipe.scheduler).__name__)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok UNet2DModel DDPMScheduler" in done.stdout


def test_export_checkpoint_writes_card_and_one_line_errors(tmp_path):
    module = recipe_module("mnist_conditional", base_channels=16, num_groups=4)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    # what Lightning's ModelCheckpoint writes, as far as loading reads it (state_dict: the EMA weights)
    payload = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save({**payload, "pytorch-lightning_version": L.__version__, "global_step": 1234, "epoch": 5}, ckpt)
    run = {"data": {"class_path": "ddpm_lightning.data.MNISTDataModule", "init_args": {"root": "/x", "batch_size": 8}}}
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(run))
    settings = {"sampler": "ddim", "num_steps": 25, "guidance_scale": 3.0, "guidance_interval": [1.0, 10.0]}
    result = {"results": {"fid_classifier": 12.5, "seconds": 3.0}, "settings": settings}
    (ckpt.parent / "last.metrics.ddim25-w3-gi1-10-n1000-seed0.json").write_text(json.dumps(result))
    out = tmp_path / "export"
    main(["export", f"--ckpt_path={ckpt}", f"--out_dir={out}"])  # the command; export_checkpoint underneath
    card = (out / "README.md").read_text()
    assert "1,234" in card and "MNISTDataModule" in card and "fid_classifier 12.5" in card and "root" not in card
    assert "| ddim | 25 | 3.0 at sigma in (1, 10] | " in card
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    assert max_delta(module, unet) <= 1e-4

    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "x")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        export_checkpoint(bad, tmp_path / "x")
    assert "\n" not in str(err.value)


# -- import -----------------------------------------------------------------------------------------------------
def finetune_model(**overrides) -> dict:
    """The finetune recipe's model section with the CIFAR-10 data sizes."""
    model = yaml.safe_load(FINETUNE.read_text())["model"]
    model = {k: v for k, v in model.items() if k not in NOT_MODEL}
    return {**model, "in_channels": 3, "image_size": 32, **overrides}


def save_unet(folder: Path, safe: bool = True, **config) -> diffusers.UNet2DModel:
    unet = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    unet.save_pretrained(folder, safe_serialization=safe)
    return unet


def test_finetune_recipe_loads_ddpm_cifar10(tmp_path):
    folder = tmp_path / "ddpm-cifar10-32"
    unet = save_unet(folder / "unet", **DDPM_CIFAR10_CONFIG)  # the Hub's pipeline layout: unet/, scheduler/
    module = DiffusionModule(**finetune_model(init_from=str(folder))).eval()
    delta = max_delta(module, unet)
    print(f"ddpm-cifar10-32 import: max |delta| {delta:.2e}")  # measured 2.0e-6
    assert delta <= 1e-4


def test_import_refuses_mismatches_and_pickles(tmp_path):
    # a narrower copy of the recipe's architecture: the config check fails before any weight is read
    narrow = tmp_path / "narrow"
    save_unet(narrow, **{**DDPM_CIFAR10_CONFIG, "block_out_channels": [32, 64, 64, 64]})
    with pytest.raises(ValueError) as err:
        DiffusionModule(**finetune_model(init_from=str(narrow)))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.endswith("block_out_channels: folder has [32, 64, 64, 64], our U-Net needs [128, 256, 256, 256]")

    tiny = dict(in_channels=1, image_size=16, base_channels=16, channel_mults=(1, 2), attention_resolutions=(8,))
    tiny.update(num_groups=4, norm_eps=1e-6, downsample_padding="bottom_right")
    net = UNet(**tiny)
    cfg = dict(DDPM_CIFAR10_CONFIG, in_channels=1, out_channels=1, sample_size=16, block_out_channels=[16, 32])
    cfg.update(norm_num_groups=4, down_block_types=["DownBlock2D", "AttnDownBlock2D"])
    cfg.update(up_block_types=["AttnUpBlock2D", "UpBlock2D"])
    save_unet(tmp_path / "eps", **{**cfg, "norm_eps": 1e-5})
    with pytest.raises(ValueError, match=r"norm_eps: folder has 1e-05, our U-Net needs 1e-06$"):
        load_diffusers_unet(tmp_path / "eps", net)

    # a tensor of the wrong shape, then an old diffusers file with legacy attention names (accepted)
    source = save_unet(tmp_path / "ok", **cfg)
    weights = load_file(tmp_path / "ok" / "diffusion_pytorch_model.safetensors")
    name = "mid_block.attentions.0.to_q.weight"
    save_file(
        {**weights, name: weights[name][:, :16].contiguous()}, tmp_path / "ok" / "diffusion_pytorch_model.safetensors"
    )
    with pytest.raises(ValueError, match=rf"tensor {name}: folder has shape \(32, 16\), our U-Net needs \(32, 32\)$"):
        load_diffusers_unet(tmp_path / "ok", net)
    legacy = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in weights.items()}
    save_file(legacy, tmp_path / "ok" / "diffusion_pytorch_model.safetensors")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 900])
    with torch.no_grad():
        assert (load_diffusers_unet(tmp_path / "ok", net).eval()(x, t) - source(x, t).sample).abs().max() <= 1e-4

    save_unet(tmp_path / "pickled", safe=False, **cfg)
    with pytest.raises(
        ValueError, match=r"refusing to load 'diffusion_pytorch_model.bin'.*pickled weights can run code"
    ):
        load_diffusers_unet(tmp_path / "pickled", net)
    with pytest.raises(FileNotFoundError, match="found neither unet/config.json nor config.json"):
        load_diffusers_unet(tmp_path / "nowhere", net)


def test_finetune_recipe_runs_fast_dev_run(tmp_path, monkeypatch):
    """`ddpm fit --config configs/finetune_ddpm_cifar10.yaml --model.init_from DIR`, shrunk: a U-Net of the recipe's
    kind (norm_eps 1e-6, bottom-right padding) but a few thousand parameters, initialised from a folder of that
    shape."""
    data = tmp_path / "images"
    write_image_folder(data)
    cfg = dict(DDPM_CIFAR10_CONFIG, sample_size=16, block_out_channels=[8, 16], norm_num_groups=4)
    cfg.update(down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])
    cfg["layers_per_block"] = 1
    pretrained = save_unet(tmp_path / "pretrained", **cfg)
    monkeypatch.chdir(tmp_path)
    shrink = ["--model.base_channels=8", "--model.channel_mults=[1,2]", "--model.num_res_blocks=1"]
    shrink += ["--model.attention_resolutions=[8]", "--model.num_groups=4", "--data.image_size=16"]
    loader = ["--data.batch_size=2", "--data.val_size=2", "--data.num_workers=0", "--data.pin_memory=false"]
    args = ["fit", f"--config={FINETUNE}", f"--data.root={data}", f"--model.init_from={tmp_path / 'pretrained'}"]
    cli = build_cli([*args, *shrink, *loader, "--trainer.precision=32-true", "--trainer.fast_dev_run=1"])
    assert cli.trainer.state.finished and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    # one Adam step at lr 2e-5 (x 1/500 warm-up) moves the pretrained weights only a little
    theirs = pretrained.state_dict()["conv_in.weight"]
    assert (cli.model.net.conv_in.weight.detach() - theirs).abs().max() < 1e-3


def test_default_unet_is_unchanged():
    """The new options' defaults are the DDPM layout: parameter count and outputs pinned with the code before them."""
    shape = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,), num_groups=4)
    net = perturb_(UNet(3, 16, num_classes=3, **shape)).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(x, torch.tensor([0, 999]), torch.tensor([1, 3])).double()
    assert sum(p.numel() for p in net.parameters()) == 177_683
    assert UNet(3, 16, num_classes=3, **net.options).options == net.options  # what the diffusers mapping reads
    assert abs(out.sum().item() - 88.27094163186848) < 1e-4 and abs(out.abs().sum().item() - 460.3655012380332) < 1e-4
