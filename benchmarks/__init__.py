"""Benchmark harness: our trainer against diffusers and denoising-diffusion-pytorch (``python -m benchmarks.bench``)."""
