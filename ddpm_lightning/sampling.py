"""The one sampling surface: :class:`SamplingConfig` (how to sample) and the registry of samplers (what can).

Every place that samples (``DiffusionModule.sample``, the SampleGrid callback, the metrics, ``ddpm sample``,
``ddpm sweep``, the demo, the experiments) takes one :class:`SamplingConfig`, read from YAML by jsonargparse
(``model.sampling``, ``metrics.sampling``, SampleGrid's ``sampling``) and validated once, here.

The samplers themselves are free functions of a ``denoise_fn`` and a :class:`GaussianDiffusion`
(:mod:`ddpm_lightning.samplers`). Adding one is one function there and one line in :data:`SAMPLERS`: a runner
that maps the config onto the function's arguments, and its count of network evaluations.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import torch
from torch import Tensor

from ddpm_lightning.diffusion import GaussianDiffusion, VarianceType
from ddpm_lightning.samplers import DenoiseFn, Generators, SampleOutput, ddim_sample, ddpm_sample
from ddpm_lightning.solvers import dpmpp_2m_sample, dpmpp_2m_sde_sample, euler_sample, heun_sample, unipc_sample
from ddpm_lightning.spacings import (
    EDM_SIGMA_MAX,
    EDM_SIGMA_MIN,
    SPACINGS,
    Convention,
    Spacing,
    choice_error,
    max_num_steps,
)


@dataclass(frozen=True)
class Sampler:
    """A registry entry.

    Attributes:
        run: ``(denoise_fn, diffusion, shape, config, **common) -> samples`` where ``common`` holds generator,
            device, x_T, return_trajectory and progress.
        nfe: ``(config, num_timesteps) -> network evaluations per sample`` of one unguided run (default: one per
            step; UniPC's corrector reuses the next step's evaluation).
        steps_for_nfe: ``(budget, num_timesteps) -> the most steps whose nfe fits the budget``.
        uses_steps: whether ``num_steps`` applies (DDPM always runs all T steps).
        uses_spacing: whether ``spacing`` applies (the solvers; DDIM has its own evenly spaced sub-sequence).
        at_steps: ``(config, k, num_timesteps) -> config`` that takes k steps with this sampler (for sweeps).
        max_steps: ``(config, num_timesteps) -> the largest num_steps it runs`` (T; T - 1 for a multistep solver
            on "uniform" spacing, whose grid has T + 1 points).
        default_spacing: the solver's spacing when the config sets none (None for DDPM and DDIM).
    """

    run: Callable[..., SampleOutput]
    nfe: Callable[[SamplingConfig, int], int] = lambda c, T: c.num_steps
    steps_for_nfe: Callable[[int, int], int] = lambda budget, T: budget
    uses_steps: bool = True
    uses_spacing: bool = True
    at_steps: Callable[[SamplingConfig, int, int], SamplingConfig] = lambda c, k, T: c.replace(num_steps=k)
    max_steps: Callable[[SamplingConfig, int], int] = lambda c, T: T
    default_spacing: Spacing | None = None


def _solver(fn: Callable[..., SampleOutput], convention: Convention, **options: Any) -> Sampler:
    """A solver's entry: its runner takes num_steps, clip_x0, spacing (None: the solver's own default) and the sigma
    range from the config; its largest num_steps is :func:`~ddpm_lightning.spacings.max_num_steps` of its spacing in
    ``convention``; ``options`` are further :class:`Sampler` fields."""

    def run(f: DenoiseFn, d: GaussianDiffusion, shape: Sequence[int], c: SamplingConfig, **kw: Any) -> SampleOutput:
        sigmas = {"sigma_max": c.sigma_max, "sigma_min": c.sigma_min}
        return fn(f, d, shape, num_steps=c.num_steps, clip_x0=c.clip_x0, spacing=c.resolved_spacing, **sigmas, **kw)

    return Sampler(
        run,
        default_spacing=inspect.signature(fn).parameters["spacing"].default,
        max_steps=lambda c, T: max_num_steps(T, c.resolved_spacing, convention),
        **options,
    )


#: name -> sampler. The sampler names appear here and nowhere else in the package.
SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(
        lambda f, d, s, c, **kw: ddpm_sample(f, d, s, variance=c.variance, clip_x0=c.clip_x0, **kw),
        nfe=lambda c, T: T,
        steps_for_nfe=lambda budget, T: T,
        uses_steps=False,
        uses_spacing=False,
        # k < T steps: ancestral sampling of the respaced chain, which is DDIM with eta = 1 on the k-step
        # sub-sequence (Song et al. 2021, sec. 4.1); k = T: exactly DDPM (Ho et al. 2020, Algorithm 2)
        at_steps=lambda c, k, T: c if k >= T else c.replace(sampler="ddim", num_steps=k, eta=1.0),
    ),
    "ddim": Sampler(
        lambda f, d, s, c, **kw: ddim_sample(f, d, s, num_steps=c.num_steps, eta=c.eta, clip_x0=c.clip_x0, **kw),
        uses_spacing=False,
    ),
    # DPM-Solver++(2M), Lu et al. 2022; its SDE variant; UniPC-bh2, Zhao et al. 2023 (multistep, uniform by default)
    "dpmpp_2m": _solver(dpmpp_2m_sample, "multistep"),
    "dpmpp_2m_sde": _solver(dpmpp_2m_sde_sample, "multistep"),
    "unipc": _solver(unipc_sample, "multistep"),
    # Karras et al. 2022, Algorithm 1: two evaluations per step but the last (an Euler step to sigma = 0)
    "heun": _solver(
        heun_sample, "karras", nfe=lambda c, T: 2 * c.num_steps - 1, steps_for_nfe=lambda b, T: (b + 1) // 2
    ),
    "euler": _solver(euler_sample, "karras"),  # Karras et al. 2022's Euler (first order)
}
DEFAULT_SAMPLER = "ddim"


@dataclass(frozen=True)
class SamplingConfig:
    """How to draw samples. Validated on construction; ``replace`` returns a validated copy.

    Args:
        sampler: a name of :data:`SAMPLERS`.
        num_steps: sampling steps (network evaluations for the first-order samplers); DDPM runs all T steps.
        eta: DDIM stochasticity (0: deterministic DDIM; 1 with all T steps: DDPM with "fixed_small" variance).
        guidance_scale: classifier-free guidance w >= 0 (Ho & Salimans 2022): 1 plain conditional, 0 unconditional;
            ignored by unconditional models.
        variance: sigma_t^2 of the DDPM reverse step, "fixed_small" (beta-tilde_t) or "fixed_large" (beta_t).
        clip_x0: clamp each predicted x_0 to the data range [-1, 1].
        spacing: where the solvers put their steps: "uniform", "trailing" or "karras" (Karras et al. 2022's sigma
            spacing); None: the solver's own default (karras for heun and euler, uniform for the others).
        sigma_max, sigma_min: the noise range "karras" spacing walks, clamped to the schedule's own
            [sigma_0, sigma_{T-1}]: by default EDM's 80 and 0.002 (Karras et al. 2022, Table 1), the start scaled to
            sigma_max's level; None: the schedule's end (sigma_{T-1} ~ 2e4 for cosine at T = 1000, as diffusers).
            Only "karras" spacing reads them; setting them for another is an error.
        guidance_interval: (sigma_lo, sigma_hi): apply guidance only at the noise levels sigma_lo < sigma <= sigma_hi
            (sigma = sqrt((1 - abar_t) / abar_t), EDM's noise level, the one ``sigma_max`` speaks), the conditional
            output alone elsewhere, one network pass instead of two (Kynkaenniemi et al. 2024, "Applying Guidance in
            a Limited Interval Improves Sample and Distribution Quality in Diffusion Models": guidance at the highest
            noise levels costs diversity, at the lowest it does little). ``sigma_hi`` may be ``.inf``. None: every
            step is guided. Only guided sampling (w not in {0, 1}) reads it.
    """

    sampler: str = DEFAULT_SAMPLER
    num_steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    variance: VarianceType = "fixed_small"
    clip_x0: bool = True
    spacing: Spacing | None = None
    sigma_max: float | None = EDM_SIGMA_MAX
    sigma_min: float | None = EDM_SIGMA_MIN
    guidance_interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise choice_error("sampler", self.sampler, list(SAMPLERS))
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}")
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if not self.guidance_scale >= 0:
            raise ValueError(
                f"guidance_scale must be >= 0 (1: conditional, 0: unconditional), got {self.guidance_scale}"
            )
        if self.variance not in get_args(VarianceType):
            raise choice_error("variance", self.variance, get_args(VarianceType))
        if self.spacing is not None:
            if self.spacing not in SPACINGS:
                raise choice_error("spacing", self.spacing, SPACINGS)
            if not SAMPLERS[self.sampler].uses_spacing:
                users = [name for name, spec in SAMPLERS.items() if spec.uses_spacing]
                raise ValueError(f"spacing applies to the solvers ({', '.join(users)}), not to {self.sampler}")
        self._check_sigma_range()
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", _interval(self.guidance_interval))

    def _check_sigma_range(self) -> None:
        for name in ("sigma_max", "sigma_min"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{name} must be a number > 0 or None (the schedule's end), got {value!r}")
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 or None (the schedule's end), got {value!r}")
        if self.sigma_max is not None and self.sigma_min is not None and not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got {self.sigma_min} and {self.sigma_max}")
        defaults = (self.sigma_max, self.sigma_min) == (EDM_SIGMA_MAX, EDM_SIGMA_MIN)
        if not defaults and self.resolved_spacing != "karras":
            raise ValueError(
                f"sigma_max and sigma_min apply to karras spacing (heun, euler, or spacing: karras), not to "
                f"{self.sampler} with {self.resolved_spacing or 'its own'} spacing"
            )

    @classmethod
    def of(cls, value: SamplingConfig | Mapping[str, Any] | None = None, **changes: Any) -> SamplingConfig:
        """A config from a config, a mapping (a checkpoint's hyperparameters, YAML) or None (defaults), with
        ``changes`` applied; an unknown key is a one-line error naming the known ones."""
        base = dict(value) if isinstance(value, Mapping) else (value.to_dict() if value is not None else {})
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in [*base, *changes]:
            if key not in fields:
                raise ValueError(f"unknown sampling setting {key!r}; choose from: {', '.join(fields)}")
        return cls(**{**base, **changes})

    def replace(self, **changes: Any) -> SamplingConfig:
        return SamplingConfig.of(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (YAML, JSON, checkpoints); ``guidance_interval`` only when set, so that the keys of results
        cached before it existed stay valid."""
        out = dataclasses.asdict(self)
        interval = out.pop("guidance_interval")
        return out | ({"guidance_interval": list(interval)} if interval is not None else {})

    @property
    def spec(self) -> Sampler:
        return SAMPLERS[self.sampler]

    @property
    def resolved_spacing(self) -> Spacing | None:
        """The spacing a run uses: the config's, else the solver's default (None for DDPM and DDIM)."""
        return self.spacing if self.spacing is not None else self.spec.default_spacing

    def steps(self, num_timesteps: int) -> int:
        """Steps actually taken on a model with T = ``num_timesteps``."""
        return self.num_steps if self.spec.uses_steps else num_timesteps

    def max_steps(self, num_timesteps: int) -> int:
        """The largest ``num_steps`` this sampler (with this spacing) runs on a model with T = ``num_timesteps``."""
        return self.spec.max_steps(self, num_timesteps)

    def guided(self, conditional: bool) -> bool:
        """Whether a guided step evaluates the network on [cond; uncond] (w not in {0, 1})."""
        return conditional and self.guidance_scale not in (0, 1)

    def at_steps(self, k: int, num_timesteps: int) -> SamplingConfig:
        """This sampler taking ``k`` steps (capped at T) on a model with T = ``num_timesteps``."""
        return self.spec.at_steps(self, min(k, num_timesteps), num_timesteps)

    def at_nfe(self, budget: int, num_timesteps: int, conditional: bool = False) -> SamplingConfig:
        """This sampler with the most steps whose :meth:`nfe` fits ``budget`` network evaluations per sample."""
        smallest = self.replace(num_steps=1).nfe(num_timesteps, conditional)
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < smallest:
            raise ValueError(f"an NFE budget for {self.sampler} must be an integer >= {smallest}, got {budget!r}")
        per_eval = 2 if self.guided(conditional) else 1
        steps = self.spec.steps_for_nfe(budget // per_eval, num_timesteps)
        return self.replace(num_steps=max(1, min(steps, num_timesteps)))

    def nfe(self, num_timesteps: int, conditional: bool = False) -> int:
        """Network evaluations per sample: a guided step counts two (the conditional and unconditional halves of
        the one batched forward pass are two evaluations of the network per sample); with a ``guidance_interval``
        an upper bound (the steps outside it take one)."""
        return self.spec.nfe(self, num_timesteps) * (2 if self.guided(conditional) else 1)

    def tag(self, conditional: bool = True) -> str:
        """Short name for file names and tables, e.g. ``ddim50-w3``, ``heun5-smaxend-w1`` (a sigma range other than
        EDM's: ``end`` is None, the schedule's end)."""
        steps = "" if not self.spec.uses_steps else str(self.num_steps)
        eta = f"-eta{self.eta:g}" if self.eta else ""
        sigmas = "".join(
            f"-s{name}{'end' if value is None else f'{value:g}'}"
            for name, value, default in (("max", self.sigma_max, EDM_SIGMA_MAX), ("min", self.sigma_min, EDM_SIGMA_MIN))
            if value != default
        )
        guidance = f"-w{self.guidance_scale:g}" if conditional else ""
        if conditional and self.guidance_interval is not None:
            guidance += "-gi{:g}-{:g}".format(*self.guidance_interval)
        return f"{self.sampler}{steps}{eta}{sigmas}{guidance}"

    def guide_at(self, diffusion: GaussianDiffusion) -> Callable[[Tensor], Tensor] | None:
        """``t (B,) -> (B,) bool``: where guidance applies on ``diffusion`` (None: everywhere), for
        :func:`~ddpm_lightning.samplers.guided_denoise_fn`."""
        if self.guidance_interval is None:
            return None
        low, high = self.guidance_interval

        def inside(t: Tensor) -> Tensor:
            sigma = diffusion.ve_sigma_at(t)
            return (sigma > low) & (sigma <= high)

        return inside


def _interval(value: Any) -> tuple[float, float]:
    """``guidance_interval`` as (sigma_lo, sigma_hi) floats with 0 <= sigma_lo < sigma_hi, or a one-line error."""
    form = "guidance_interval must be [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi (sigma_hi may be .inf)"
    numbers = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    if not numbers or any(isinstance(v, bool) or not isinstance(v, int | float) for v in value):
        raise ValueError(f"{form}, got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and 0 <= low < high):  # a NaN fails the comparison
        raise ValueError(f"{form}, got {value!r}")
    return low, high


DEFAULT_SAMPLING = SamplingConfig()  # the neutral default of every `sampling` argument


def sample(
    denoise_fn: DenoiseFn,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    config: SamplingConfig | None = None,
    *,
    generator: Generators = None,
    device: torch.device | str | None = None,
    x_T: Tensor | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    **changes: Any,
) -> SampleOutput:
    """Run the sampler ``config`` names (fields in ``changes`` override it), e.g.
    ``sample(f, diffusion, (16, 1, 28, 28), SamplingConfig(sampler="ddim", num_steps=25))``.

    Guidance is already inside ``denoise_fn`` (:func:`ddpm_lightning.samplers.guided_denoise_fn`), so
    ``config.guidance_scale`` and ``config.guidance_interval`` are not used here.
    """
    config = SamplingConfig.of(config, **changes)
    common = dict(generator=generator, device=device, x_T=x_T, return_trajectory=return_trajectory, progress=progress)
    return config.spec.run(denoise_fn, diffusion, shape, config, **common)


def check_runs(config: SamplingConfig, diffusion: GaussianDiffusion) -> None:
    """Raise now, in one line, if ``config`` cannot run on ``diffusion`` (e.g. more steps than T allows): a dry run
    with a zero denoiser on one 1-pixel image, so that callbacks fail before training rather than at an epoch's end."""
    with torch.inference_mode():
        sample(lambda x, t: torch.zeros_like(x), diffusion, (1, 1, 1, 1), config, device="cpu")
