"""The one sampling surface: SamplingConfig validation, the registry's NFE accounting, YAML and command-line reading."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO

from ddpm_lightning.commands import COMMANDS
from ddpm_lightning.diffusion import GaussianDiffusion
from ddpm_lightning.main import main
from ddpm_lightning.metrics.evaluator import kid_subset_size
from ddpm_lightning.metrics.stats import kid
from ddpm_lightning.sampling import SAMPLERS, SamplingConfig, sample
from ddpm_lightning.schedules import make_betas


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"sampler": "plms"}, "unknown sampler 'plms'; choose one of: ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, unipc"),
        ({"variance": "learned"}, "unknown variance 'learned'; choose one of: fixed_small, fixed_large"),
        ({"sampler": "heun", "spacing": "log"}, "unknown spacing 'log'; choose one of: uniform, trailing, karras"),
        ({"sampler": "ddim", "spacing": "karras"}, "spacing applies to the solvers (dpmpp_2m"),
        ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
        ({"num_steps": 0}, "num_steps must be an integer >= 1"),
        ({"num_steps": 2.5}, "num_steps must be an integer >= 1"),
        ({"eta": -0.1}, "eta must be >= 0"),
        ({"steps": 10}, "unknown sampling setting 'steps'; choose from: sampler, num_steps"),
        ({"sampler": "heun", "sigma_max": 0.0}, "sigma_max must be a finite number > 0 or None"),
        ({"sampler": "heun", "sigma_min": float("nan")}, "sigma_min must be a finite number > 0 or None"),
        ({"sampler": "heun", "sigma_max": "80"}, "sigma_max must be a number > 0 or None"),
        ({"sampler": "euler", "sigma_max": 1.0, "sigma_min": 2.0}, "sigma_min must be < sigma_max, got 2.0 and 1.0"),
        ({"sampler": "ddim", "sigma_max": None}, "sigma_max and sigma_min apply to karras spacing"),
        ({"sampler": "unipc", "sigma_max": 10.0}, "not to unipc with uniform spacing"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_allowed_values(settings, needle):
    with pytest.raises(ValueError) as info:
        SamplingConfig.of(settings)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_nfe_counts_every_network_evaluation():
    T = 1000
    assert SamplingConfig(sampler="ddim", num_steps=50).nfe(T) == 50
    assert SamplingConfig(sampler="ddpm", num_steps=50).nfe(T) == T  # DDPM runs all T steps
    assert SamplingConfig(sampler="heun", num_steps=10).nfe(T) == 19  # the last step is Euler
    guided = SamplingConfig(sampler="dpmpp_2m", num_steps=10, guidance_scale=3.0)
    assert guided.nfe(T, conditional=True) == 20 and guided.nfe(T, conditional=False) == 10
    for w in (0.0, 1.0):  # one pass: unconditional, or plainly conditional
        assert guided.replace(guidance_scale=w).nfe(T, conditional=True) == 10
    assert guided.at_nfe(20, T, conditional=True).num_steps == 10
    assert SamplingConfig(sampler="heun").at_nfe(19, T).num_steps == 10
    with pytest.raises(ValueError, match="an NFE budget for ddpm must be an integer >= 1000"):
        SamplingConfig(sampler="ddpm").at_nfe(50, T)


def test_every_registered_sampler_counts_the_evaluations_it_makes():
    """The registry's nfe is what a sampler actually spends: count the calls of the denoiser."""
    d = GaussianDiffusion(make_betas("linear", 50))
    for name in SAMPLERS:
        config = SamplingConfig(sampler=name, num_steps=7)
        calls: list[int] = []

        def denoise(x, t, calls=calls):
            calls.append(1)
            return 0.1 * x

        sample(denoise, d, (2, 1, 4, 4), config, generator=torch.Generator())
        assert len(calls) == config.nfe(d.num_timesteps), name


def test_sweep_plans_follow_the_registry():
    from ddpm_lightning.commands.sweep import plan, plan_nfe

    base = SamplingConfig(guidance_scale=3.0)
    rows = plan(["ddim", "ddpm"], [10, 100], base, 100)
    # DDPM at k < T steps is DDIM with eta = 1 on the k-step sub-sequence; at T it is DDPM itself
    assert [(n, c.sampler, c.steps(100), c.eta) for n, c in rows] == [
        ("ddim", "ddim", 10, 0.0),
        ("ddim", "ddim", 100, 0.0),
        ("ddpm", "ddim", 10, 1.0),
        ("ddpm", "ddpm", 100, 0.0),
    ]
    rows = plan_nfe(["heun", "dpmpp_2m", "ddpm"], [10, 20, 21], base, 1000, conditional=True)
    assert [(n, c.num_steps, c.nfe(1000, True)) for n, c in rows] == [
        ("heun", 3, 10),
        ("heun", 5, 18),
        ("dpmpp_2m", 5, 10),
        ("dpmpp_2m", 10, 20),
    ]  # heun at 21 is heun at 20 (5 steps, 18 NFE): one row; DDPM needs 2T: skipped


def test_kid_std_is_a_real_spread_when_subsets_are_smaller_than_n():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 8, generator=gen), torch.randn(200, 8, generator=gen) + 0.5
    _, std_whole = kid(a, b, subset_size=200)  # every subset is the whole set
    _, std = kid(a, b, subset_size=kid_subset_size(200))
    assert std_whole < 1e-9 < 1e-4 < std and kid_subset_size(200) == 100 and kid_subset_size(5000) == 1000


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS), out


def test_sample_reads_the_recipe_sampling_section(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", f"--config={REPO / 'configs' / 'mnist_conditional.yaml'}", "--ckpt_path=x", "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert (
        "guidance_scale: 3.0" in printed
        and "sampler: unipc" in printed
        and "num_steps: 10" in printed
        and "ckpt_path: x" in printed
    )


def _printed_config(capsys, argv: list[str]) -> dict:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--print_config"])
    assert info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_config_is_a_recipe_or_the_commands_own_options_applied_in_order(tmp_path, capsys):
    """One --config action: a recipe's sections or a file --print_config wrote; what comes later on the line wins."""
    recipe = REPO / "configs" / "mnist_conditional.yaml"
    printed = _printed_config(capsys, ["sample", f"--config={recipe}", "--ckpt_path=a.ckpt", "--num_steps=7"])
    assert (printed["sampler"], printed["num_steps"], printed["guidance_scale"]) == ("unipc", 7, 3.0)
    before = _printed_config(capsys, ["sample", "--num_steps=7", f"--config={recipe}", "--ckpt_path=a.ckpt"])
    assert before["num_steps"] == 10  # the recipe came later

    own = tmp_path / "sample.yaml"
    own.write_text(yaml.safe_dump({**printed, "seed": 5}))
    again = _printed_config(capsys, ["sample", f"--config={own}", "--labels", "3"])
    assert again == {**printed, "seed": 5, "labels": [3]}

    with pytest.raises(SystemExit) as info:
        main(["export", f"--config={recipe}", "--out_dir=x"])
    err = capsys.readouterr().err
    assert (
        info.value.code == 2
        and err == "ddpm: error: ddpm export reads no training recipe; --config takes a file of its own options\n"
    )


def test_sigma_range_flags_tell_null_from_unset():
    """``--sigma_max null`` is the schedule's end, ``--guidance_interval null`` every step; an unset flag keeps the
    base config's value."""
    from ddpm_lightning.commands.base import add_sampling_arguments, new_parser, sampling_from

    parser = new_parser("ddpm x", "")
    add_sampling_arguments(parser)
    base = SamplingConfig(sampler="heun", sigma_max=20.0)
    assert sampling_from(parser.parse_args([]), base) == base
    assert sampling_from(parser.parse_args(["--sigma_max", "null"]), base).sigma_max is None
    changed = sampling_from(parser.parse_args(["--sigma_max", "5", "--sigma_min", "0.1"]), base)
    assert (changed.sigma_max, changed.sigma_min) == (5.0, 0.1)
    assert SamplingConfig.of({"sampler": "unipc", "spacing": "karras", "sigma_min": None}).sigma_min is None
    # the recipe guides in sigma (1, 10]: --guidance_interval null guides every step, --spacing null is the solver's
    guided = SamplingConfig(sampler="unipc", guidance_scale=3.0, guidance_interval=(1.0, 10.0), spacing="karras")
    assert sampling_from(parser.parse_args([]), guided) == guided
    every = sampling_from(parser.parse_args(["--guidance_interval", "null", "--spacing", "null"]), guided)
    assert (every.guidance_interval, every.spacing, every.guidance_scale) == (None, None, 3.0)
    narrower = sampling_from(parser.parse_args(["--guidance_interval", "[1.5, 10]"]), guided)
    assert narrower.guidance_interval == (1.5, 10.0)
    assert SamplingConfig(sampler="heun", num_steps=5).tag() == "heun5-w1"  # file names tell the ranges apart
    full = SamplingConfig(sampler="heun", num_steps=5, sigma_max=None, sigma_min=0.01)
    assert full.tag() == "heun5-smaxend-smin0.01-w1"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["sweep", "--ckpt_path=x"], "recipe"),
        (["sample", "--config=nowhere.yaml"], "--config 'nowhere.yaml': No such file or directory"),
        (["sample"], "ckpt_path"),
        (["bogus"], "unknown command 'bogus'; choose one of: fit, validate, test"),
    ],
)
def test_bad_command_lines_are_one_line_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("ddpm: error:") and needle in err and err.count("\n") == 1, err


def test_a_setting_the_model_cannot_run_is_refused_before_training():
    from ddpm_lightning.sampling import check_runs

    d = GaussianDiffusion(make_betas("cosine", 10))
    check_runs(SamplingConfig(sampler="unipc", num_steps=9), d)
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 9\]"):
        check_runs(SamplingConfig(sampler="unipc", num_steps=10), d)
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 10\]"):
        check_runs(SamplingConfig(sampler="ddim", num_steps=11), d)
