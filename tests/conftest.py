"""Shared fixtures: the real offline datasets in ../shared/data and tiny model overrides for fast CPU runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from standins import STANDIN_CONFIGS

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DDPM_SHARED_DATA", REPO.parent / "shared" / "data"))
ALL_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
#: configs over datasets we have for real (MNIST, Fashion-MNIST); the others run on stand-ins in test_datasets.py
#: (classifier_*.yaml belong to `ddpm classifier` and run in test_classifier.py)
CLASSIFIER_CONFIGS = {c.stem for c in ALL_CONFIGS if c.stem.startswith("classifier_")}
#: finetune_*.yaml start from a diffusers folder (model.init_from) and run in test_hub.py
FINETUNE_CONFIGS = {c.stem for c in ALL_CONFIGS if c.stem.startswith("finetune_")}
#: hf_*.yaml read a Hugging Face dataset (data.path) and run in test_hf_data.py
HF_CONFIGS = {c.stem for c in ALL_CONFIGS if c.stem.startswith("hf_")}
CONFIGS = [c for c in ALL_CONFIGS if c.stem not in STANDIN_CONFIGS | CLASSIFIER_CONFIGS | FINETUNE_CONFIGS | HF_CONFIGS]

#: overrides that shrink any config's U-Net to a few thousand parameters for fast_dev_run on CPU
TINY_MODEL_ARGS = [
    "--model.base_channels=8",
    "--model.channel_mults=[1,2]",
    "--model.num_res_blocks=1",
    "--model.attention_resolutions=[14]",
    "--model.num_groups=4",
]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real MNIST / Fashion-MNIST files (torchvision layout); skips when absent."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        msg = f"real data not found at {SHARED_DATA} (set DDPM_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI always has ../shared/data: its absence is a broken setup, not a skip
        pytest.skip(msg)
    return SHARED_DATA


# The test models are tiny: one intra-op thread is faster than two there, and immune to the catastrophic
# OpenMP slow-down (10x measured) when another process holds the second core. DDPM_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("DDPM_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    # a test that set the thread count (the experiments runner does) must not change the float sums of the next:
    # the bitwise resume tests compare an in-process run with a 1-thread subprocess
    torch.set_num_threads(threads)


@pytest.fixture
def lightning_caplog(caplog):
    """caplog that also sees Lightning's messages (rank_zero_info): Lightning's logger may stop propagating to the
    root logger (where caplog listens) once a Trainer has configured it in an earlier test."""
    import logging

    logger = logging.getLogger("lightning.pytorch")
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    propagate, logger.propagate = logger.propagate, True
    yield caplog
    logger.propagate = propagate


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if this process (server threads included) looked up or connected to a non-loopback host.
    Attempts are recorded, not raised: libraries swallow their own network errors."""
    import socket

    attempts: list[str] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and str(host) not in LOOPBACK:
            attempts.append(f"look-up of {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            attempts.append(f"connection to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield
    assert attempts == [], attempts
