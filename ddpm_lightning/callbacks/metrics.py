"""Sample-quality metrics: FID, KID, IS, precision/recall and conditional accuracy, at ``ddpm test`` and (opt-in)
during training; with ``nll: true``, ``ddpm test`` also bounds the test-set NLL in bits/dim.

The CLI adds this callback under the ``metrics`` key: ``ddpm test --config X.yaml --ckpt_path C --metrics.num_samples
2000``. During ``fit`` it runs only when ``every_n_epochs`` is set: a metric never costs time silently. Then each
rank generates its share of the samples, the FID and its wall time (``metrics/seconds``) are logged, and a
``ModelCheckpoint`` on ``metrics/fid_<extractor>`` keeps the lowest-FID checkpoint, ``best-fid-....ckpt`` (score_sde
publishes its checkpoint by FID the same way), beside the recipe's own checkpoints. The work is
done by the Lightning-free :class:`~ddpm_lightning.metrics.evaluator.Evaluator`; this callback holds the hooks, the
logging, the DDP gather and the JSON file (the numbers and everything needed to reproduce them) beside the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from ddpm_lightning.callbacks.ema import ema_weights
from ddpm_lightning.diffusion import VarianceType
from ddpm_lightning.metrics.evaluator import Evaluator
from ddpm_lightning.metrics.nll import dataset_nll
from ddpm_lightning.sampling import DEFAULT_SAMPLING, SamplingConfig, check_runs, choice_error


class SampleMetrics(Callback):
    """Generate ``num_samples`` images with the (EMA) model and score them against real data.

    Args:
        num_samples, sampling, seed, batch_size, extractors, classifier, inception_weights, reference_split,
            reference_num, cache_dir, background: see :class:`~ddpm_lightning.metrics.evaluator.Evaluator`.
        every_n_epochs: also evaluate during ``fit`` every n epochs (``None``: only at ``ddpm test``).
        keep_best: with every_n_epochs, keep the checkpoint of the lowest sample FID (of the first extractor) as
            ``best-fid-epoch=E-fid_<extractor>=F.ckpt`` in the run's checkpoint folder.
        nll: at ``ddpm test``, also the variational bound on the NLL (:mod:`ddpm_lightning.likelihood`) of
            ``nll_num_images`` test images, in bits/dim with its standard error (T network evaluations per image).
        nll_num_images: test images in the NLL (the first of the split's subset seeded by ``seed``).
        nll_variance: sigma_t^2 of the reverse steps in the bound: "fixed_large" (beta_t) or "fixed_small".
    """

    def __init__(
        self,
        num_samples: int = 1000,
        sampling: SamplingConfig = DEFAULT_SAMPLING,
        seed: int = 0,
        batch_size: int = 250,
        extractors: list[Literal["classifier", "inception"]] | None = None,
        classifier: str = "mnist",
        inception_weights: str | None = None,
        reference_split: Literal["train", "test"] = "test",
        reference_num: int | None = None,
        every_n_epochs: int | None = None,
        keep_best: bool = True,
        cache_dir: str | None = None,
        background: bool = False,
        nll: bool = False,
        nll_num_images: int = 100,
        nll_variance: VarianceType = "fixed_large",
    ) -> None:
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError("every_n_epochs must be >= 1 (or null)")
        if nll_num_images < 2:
            raise ValueError(f"nll_num_images must be >= 2 (a standard error needs two images), got {nll_num_images}")
        if nll_variance not in get_args(VarianceType):
            raise choice_error("nll_variance", nll_variance, get_args(VarianceType))
        self.evaluator = Evaluator(
            num_samples=num_samples,
            sampling=SamplingConfig.of(sampling),
            seed=seed,
            batch_size=batch_size,
            extractors=list(extractors or ["classifier"]),
            classifier=classifier,
            inception_weights=inception_weights,
            reference_split=reference_split,
            reference_num=reference_num,
            cache_dir=cache_dir,
            background=background,
        )
        self.every_n_epochs = every_n_epochs
        self.keep_best = keep_best
        self.best_checkpoint: ModelCheckpoint | None = None
        self.nll, self.nll_num_images, self.nll_variance = nll, nll_num_images, nll_variance
        self.results: dict[str, float] = {}
        self.json_path: Path | None = None

    @property
    def settings(self) -> dict[str, Any]:
        nll = {"nll_num_images": self.nll_num_images, "nll_variance": self.nll_variance} if self.nll else {}
        return {**self.evaluator.settings, **nll}

    @property
    def monitor(self) -> str:
        """The logged key the best checkpoint follows: ``metrics/fid_<first extractor>``."""
        return f"metrics/fid_{self.evaluator.extractors[0]}"

    # -- hooks ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # a setting the model cannot sample with stops the run now (one line), not after an epoch or the test loop
        if stage == "test" or (stage == "fit" and self.every_n_epochs is not None):
            check_runs(self.evaluator.sampling, pl_module.diffusion)
        if stage == "fit":
            self.add_best_checkpoint(trainer)

    def add_best_checkpoint(self, trainer: L.Trainer) -> None:
        """With every_n_epochs and keep_best: add the ModelCheckpoint of the best FID to ``trainer`` (once; at setup,
        before a resumed run restores its state). It saves at the end of the same epochs as the metrics run, after
        them (Lightning runs checkpoint callbacks last)."""
        if self.every_n_epochs is None or not self.keep_best or self.best_checkpoint is not None:
            return
        name = self.monitor.split("/")[1]
        self.best_checkpoint = ModelCheckpoint(
            monitor=self.monitor, mode="min", save_top_k=1, every_n_epochs=self.every_n_epochs,
            save_on_train_epoch_end=True, filename=f"best-fid-epoch={{epoch:03d}}-{name}={{{self.monitor}:.2f}}",
            auto_insert_metric_name=False,
        )  # fmt: skip
        trainer.callbacks.append(self.best_checkpoint)  # the hook loop over trainer.callbacks reaches its setup too

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs is None or trainer.sanity_checking or trainer.fast_dev_run:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            with ema_weights(trainer, pl_module):
                self.evaluate(trainer, pl_module, prefix="metrics")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = self.evaluate(trainer, pl_module, prefix="test")
        if self.nll:
            results = {**results, **self.likelihood(trainer, pl_module, prefix="test")}
            self.results = results
        if trainer.is_global_zero:
            self._write_json(trainer, results)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> dict[str, float]:
        """Compute the metrics on every rank (features gathered), log them under ``prefix/``."""
        results = self.evaluator.evaluate(
            pl_module,
            trainer.datamodule,
            rank=trainer.global_rank,
            world=trainer.world_size,
            gather=lambda t: pl_module.all_gather(t.to(pl_module.device)).cpu(),
            progress=trainer.is_global_zero,
        )
        for key, value in results.items():  # the same numbers on every rank (gathered features): the best-FID
            pl_module.log(f"{prefix}/{key}", value, sync_dist=True)  # checkpoint reads them on each rank
        n = self.evaluator.num_samples
        rank_zero_info(f"{prefix} metrics ({n} samples): " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
        self.results = results
        return results

    def likelihood(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> dict[str, float]:
        """The test-set NLL bound in bits/dim on every rank (its share of the images, gathered), logged."""
        ev = self.evaluator
        results = dataset_nll(
            pl_module, trainer.datamodule, self.nll_num_images, seed=ev.seed, variance=self.nll_variance,
            batch_size=ev.batch_size, rank=trainer.global_rank, world=trainer.world_size,
            gather=lambda t: pl_module.all_gather(t.to(pl_module.device)).cpu(),
        )  # fmt: skip
        for key, value in results.items():
            pl_module.log(f"{prefix}/{key}", value, sync_dist=True)
        n = int(results["nll_num_images"])
        rank_zero_info(
            f"{prefix} NLL: {results['nll_bpd']:.4f} ± {results['nll_bpd_stderr']:.4f} bits/dim (variational bound, "
            f"{n} test images, {self.nll_variance} variance)"
        )
        return results

    def _write_json(self, trainer: L.Trainer, results: dict[str, float]) -> Path | None:
        ev = self.evaluator
        ckpt = getattr(trainer, "ckpt_path", None)
        folder = Path(ckpt).parent if ckpt else Path(trainer.log_dir or ".")
        stem = Path(ckpt).stem if ckpt else "model"
        tag = f"{ev.sampling.tag()}-n{ev.num_samples}-seed{ev.seed}"
        path = folder / f"{stem}.metrics.{tag}.json"
        dm = trainer.datamodule
        payload = {
            "results": results,
            "settings": {**self.settings, "dataset": type(dm).__name__, "image_size": dm.image_size},
            "extractors": ev.extractor_names(),
            "checkpoint": str(ckpt) if ckpt else None,
            "world_size": trainer.world_size,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
        rank_zero_info(f"metrics written to {path}")
        self.json_path = path
        return path
