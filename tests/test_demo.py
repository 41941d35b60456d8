"""`ddpm demo`: limits and determinism, the command line, gradio's client API, and the page in headless Chromium.

The server runs in this process on a free loopback port over a tiny conditional checkpoint made here (2 training
steps with the EMA callback), with gradio's telemetry off and no share link. The browser is Debian's Chromium
(/usr/bin/chromium) driven by Playwright's Python package; Playwright never downloads a browser. CI installs
gradio, playwright and chromium (.ci/run); elsewhere these tests skip when one is missing.

`make demo-screenshot` re-takes docs/demo.png through :func:`test_screenshot_for_docs`.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import shutil
import socket
import zipfile
from pathlib import Path
from urllib.parse import urlparse

# before gradio and huggingface_hub are imported: no telemetry, no version check, no hub look-ups (gradio_client's
# headers would otherwise fetch a registry from the hub)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning import demo
from ddpm_lightning.callbacks import EMA
from ddpm_lightning.main import main as ddpm_main
from ddpm_lightning.module import DiffusionModule

CHROMIUM = Path(os.environ.get("DDPM_CHROMIUM", "/usr/bin/chromium"))
#: Chromium with no GPU, no sandbox (CI runs as root) and no calls home. Even with the background-networking flags
#: it still looks up Google's update, sign-in and autofill hosts; the resolver rule answers every name but the
#: loopback one with "not found" inside Chromium, so not even a DNS query leaves the machine.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
TINY = {
    "in_channels": 1,
    "image_size": 8,
    "base_channels": 8,
    "channel_mults": (1, 2),
    "num_res_blocks": 1,
    "num_groups": 4,
    "num_timesteps": 50,
    "conditional": True,
    "num_classes": 3,
    "cond_drop_prob": 0.1,
}


def _need(module: str):
    """Import an optional test dependency: CI installs it, so there a missing one fails; elsewhere it skips."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[dev]')")


# -- fixtures ---------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_network(no_network):
    """Every test here fails if gradio, its client or Chromium reached beyond loopback (see conftest.no_network)."""
    yield


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A conditional 8x8 model after 2 optimizer steps, saved by Lightning with the EMA weights in its state_dict."""
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    y = torch.arange(8) % TINY["num_classes"]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        callbacks=[EMA(decay=0.9)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DiffusionModule(**TINY), DataLoader(TensorDataset(x, y), batch_size=4))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def model(tiny_ckpt) -> DiffusionModule:
    return DiffusionModule.from_checkpoint(tiny_ckpt, "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model: DiffusionModule, out_dir: Path, max_batch: int = 16):
    """(app, url) of the page served on a free loopback port, in a thread of this process."""
    _need("gradio")
    app = demo.build_app(model, out_dir, max_batch=max_batch)
    port = _free_port()
    demo.serve(app, "127.0.0.1", port, block=False)
    return app, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    app, url = _start(model, tmp_path_factory.mktemp("demo-out"))
    yield url
    app.close()


def _expected_grid(model: DiffusionModule, seed: int, **settings) -> np.ndarray:
    """The grid the page should show, computed here straight from the model (not through the demo's code)."""
    n = settings["batch_size"]
    gen = torch.Generator().manual_seed(seed)
    images = model.sample(
        n,
        labels=settings["labels"],
        sampler=settings.get("sampler", "ddim"),
        num_steps=settings["num_steps"],
        guidance_scale=settings.get("guidance_scale", 1.0),
        generator=gen,
    )
    return demo.to_uint8_grid(images.float(), nrow=int(np.ceil(np.sqrt(n))))


# -- limits, determinism, command line (no server) ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"batch_size": 17}, "batch size must be an integer in [1, 16]"),
        ({"batch_size": 0}, "batch size must be an integer in [1, 16]"),
        ({"num_steps": 51}, "steps must be an integer in [1, 50]"),
        ({"num_steps": 0}, "steps must be an integer in [1, 50]"),
        ({"num_steps": 2.5}, "steps must be an integer"),
        # each sampler's own range: a multistep solver on uniform spacing takes at most T - 1 = 49 steps
        ({"sampler": "unipc", "num_steps": 50}, "steps must be an integer in [1, 49] for unipc on this model (T = 50)"),
        ({"sampler": "dpmpp_2m", "num_steps": 50}, "steps must be an integer in [1, 49] for dpmpp_2m"),
        ({"sampler": "heun", "num_steps": 51}, "steps must be an integer in [1, 50] for heun"),
        ({"guidance_scale": 11.0}, "guidance scale must be in [0, 10]"),
        ({"guidance_scale": -1.0}, "guidance scale must be in [0, 10]"),
        ({"seed": -1}, "seed must be an integer"),
        ({"seed": None}, "seed must be an integer"),
        (
            {"sampler": "bogus"},
            "unknown sampler 'bogus'; choose one of: ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, unipc, heun, euler",
        ),
    ],
)
def test_absurd_requests_are_refused_with_a_message(model, change, needle):
    request = {"sampler": "ddim", "num_steps": 10, "guidance_scale": 1.0, "seed": 0, "batch_size": 4} | change
    with pytest.raises(demo.DemoError) as info:
        demo.check_request(model, **request, max_batch=16)
    assert needle in str(info.value)


def test_request_inside_the_limits_passes(model):
    demo.check_request(model, "ddpm", 50, 10.0, 2**63 - 1, 16, max_batch=16)
    demo.check_request(model, "ddim", 1, 0.0, 0, 1, max_batch=16)
    for sampler, high in [("unipc", 49), ("dpmpp_2m_sde", 49), ("heun", 50), ("euler", 50)]:
        demo.check_request(model, sampler, high, 1.0, 0, 1, max_batch=16)  # and the sampler really runs that many:
        images, _ = demo.generate(model, "0", sampler, high, 1.0, 0, 1)
        assert images.shape == (1, 1, 8, 8) and torch.isfinite(images).all()
    with pytest.raises(demo.DemoError, match="class must be 'all' or an integer in \\[0, 2\\]"):
        demo.batch_labels(model, "3", 4)


def test_steps_slider_spans_the_chosen_samplers_range(model):
    gr = _need("gradio")
    for sampler, value, (high, shown) in [("unipc", 50, (49, 49)), ("ddim", 30, (50, 30)), ("heun", 50, (50, 50))]:
        slider = demo.steps_slider_update(gr, model, sampler, value)
        assert (slider.maximum, slider.value) == (high, shown), sampler
        assert f"1 to {high} for {sampler}" in slider.info
    assert "DDPM always runs all T = 50 steps" in demo.steps_slider_update(gr, model, "ddpm", 10).info


def test_generation_is_deterministic_given_the_seed(model):
    a, strip_a = demo.generate(model, "1", "ddim", 5, 2.0, seed=3, batch_size=5)
    b, strip_b = demo.generate(model, "1", "ddim", 5, 2.0, seed=3, batch_size=5)
    c, _ = demo.generate(model, "1", "ddim", 5, 2.0, seed=4, batch_size=5)
    assert a.shape == (5, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and torch.equal(strip_a, strip_b)
    assert not torch.allclose(a, c)
    assert strip_a.shape == (4 * 6, 1, 8, 8)  # 4 rows x (5 steps + 1) frames: fewer steps than the 10 frames asked


def test_trajectory_is_skipped_when_too_large_for_memory(model, monkeypatch):
    monkeypatch.setattr(demo, "MAX_TRAJECTORY_BYTES", 6 * 2 * 64 * 4 - 1)  # one byte short of (5 + 1) x 2 x 8 x 8
    images, strip = demo.generate(model, "all", "ddim", 5, 1.0, seed=0, batch_size=2)
    assert images.shape == (2, 1, 8, 8) and strip is None


@pytest.mark.parametrize("content", [None, b"not a checkpoint", b"PK\x03\x04 truncated zip"])
def test_missing_or_corrupt_checkpoint_is_one_line_and_exit_2(content, tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as info:
        ddpm_main(["demo", "--ckpt_path", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm: error: ") and str(path) in err and len(err.strip().splitlines()) == 1, err


def test_bad_flags_are_one_line_and_exit_2(capsys):
    for argv in (
        ["demo"],
        ["demo", "--ckpt_path", "x", "--port", "70000"],
        ["demo", "--ckpt_path", "x", "--bogus"],
        ["demo", "--ckpt_path", "x", "--device", "gpu7"],
    ):
        with pytest.raises(SystemExit) as info:
            ddpm_main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("ddpm: error: ") and len(err.strip().splitlines()) == 1, err


def test_missing_gradio_is_one_line_and_exit_2(tiny_ckpt, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real_find_spec(name, *a)
    )
    with pytest.raises(SystemExit) as info:
        ddpm_main(["demo", "--ckpt_path", str(tiny_ckpt)])
    assert info.value.code == 2
    assert capsys.readouterr().err == "ddpm: error: the demo needs gradio: pip install -e '.[demo]'\n"


def test_binds_to_loopback_without_share_link_unless_told(tiny_ckpt, monkeypatch):
    gr = _need("gradio")
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED")  # `ddpm demo` sets it itself
    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: calls.append(kwargs))
    ddpm_main(["demo", "--ckpt_path", str(tiny_ckpt)])
    ddpm_main(["demo", "--ckpt_path", str(tiny_ckpt), "--host", "0.0.0.0", "--port", "8000"])
    assert (calls[0]["server_name"], calls[0]["server_port"], calls[0]["share"]) == ("127.0.0.1", 7860, False)
    assert (calls[1]["server_name"], calls[1]["server_port"], calls[1]["share"]) == ("0.0.0.0", 8000, False)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


# -- gradio's client API --------------------------------------------------------------------------------------------
def test_client_api_returns_grid_trajectory_and_zip(server, model, tmp_path):
    client_mod = _need("gradio_client")
    client = client_mod.Client(server, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    grid_path, strip_path, zip_path = client.predict("1", "ddim", 10, 2.0, 7, 6, api_name="/generate")

    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    expected = _expected_grid(model, 7, batch_size=6, labels=[1] * 6, num_steps=10, guidance_scale=2.0)
    np.testing.assert_array_equal(grid, expected)  # PNG end to end: the exact pixels of the model's samples
    # the strip: 4 rows (first images) x 10 frames of 8x8 images with 2-pixel gutters, noise left, sample right
    assert Image.open(strip_path).size == (10 * 10 + 2, 4 * 10 + 2)
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        assert names == {f"sample_{i:03d}.png" for i in range(6)} | {"grid.png", "trajectory.png", "settings.json"}
        first = np.asarray(Image.open(io.BytesIO(zf.read("sample_000.png"))).convert("RGB"))
    np.testing.assert_array_equal(first, expected[2:10, 2:10])  # native 8x8, the grid's top-left image

    # all classes, DDPM: every one of the T = 50 steps, deterministic across calls
    again = [client.predict("all", "ddpm", 1, 1.0, 5, 3, api_name="/generate")[0] for _ in range(2)]
    assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(again[1])))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        # the sliders' own bounds (gradio checks them before the handler runs) ...
        (("0", "ddim", 10, 1.0, 0, 1000), "Value 1000 is greater than maximum value 16"),
        (("0", "ddim", 51, 1.0, 0, 2), "Value 51 is greater than maximum value 50"),
        (("0", "ddim", 0, 1.0, 0, 2), "Value 0 is less than minimum value 1"),
        (("0", "ddim", 10, 99.0, 0, 2), "Value 99.0 is greater than maximum value 10.0"),
        # ... and the handler's checks for what they let through
        (("0", "ddim", 2.5, 1.0, 0, 2), "steps must be an integer in [1, 50]"),
        (("0", "unipc", 50, 1.0, 0, 2), "steps must be an integer in [1, 49] for unipc"),  # not the solver's error
        (("0", "ddim", 10, 1.0, None, 2), "seed must be an integer"),
        (("0", "bogus", 10, 1.0, 0, 2), "bogus"),  # gradio's choices check, or the handler's
        (("7", "ddim", 10, 1.0, 0, 2), "7"),
    ],
)
def test_client_api_refuses_absurd_requests(server, args, needle):
    client_mod = _need("gradio_client")
    client = client_mod.Client(server, verbose=False, analytics_enabled=False)
    with pytest.raises(client_mod.exceptions.AppError) as info:
        client.predict(*args, api_name="/generate")
    assert needle in str(info.value)


# -- the page in headless Chromium ----------------------------------------------------------------------------------
def _browser(tmp_path: Path):
    """(playwright, context, external) of Debian's Chromium with a fresh profile; the page's requests off this
    machine are refused and listed in ``external``."""
    sync_api = _need("playwright.sync_api")
    if not CHROMIUM.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} not found: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    pw = sync_api.sync_playwright().start()
    context = pw.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"),
        executable_path=str(CHROMIUM),
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 900},
    )
    external: list[str] = []

    def only_local(route):
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    context.route("**/*", only_local)
    return pw, context, external


def _generate(page, seed: int, steps: int | None = None) -> bytes:
    """Type the seed (and steps), click Generate, wait for a new grid image and return its PNG bytes."""
    before = page.locator("#grid img").first.get_attribute("src") if page.locator("#grid img").count() else None
    page.locator("#seed input").fill(str(seed))
    if steps is not None:
        page.locator("#steps input[type=number]").fill(str(steps))
        page.locator("#steps input[type=number]").press("Enter")
    page.locator("#generate").click()
    page.wait_for_function(
        "before => { const img = document.querySelector('#grid img'); return img && img.src && img.src !== before }",
        arg=before,
        timeout=30_000,
    )
    src = page.locator("#grid img").first.get_attribute("src")
    response = page.request.get(src if src.startswith("http") else page.url.rstrip("/") + "/" + src.lstrip("/"))
    assert response.ok, response.status
    return response.body()


def test_browser_generates_and_same_seed_gives_same_image(server, model, tmp_path):
    pw, context, external = _browser(tmp_path)
    try:
        page = context.new_page()
        page.goto(server)
        page.locator("#generate").wait_for(timeout=30_000)
        first = _generate(page, seed=3, steps=10)
        other = _generate(page, seed=4)
        again = _generate(page, seed=3)
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        assert external == []  # the page loads nothing from off this machine
    finally:
        context.close()
        pw.stop()
    shown = np.asarray(Image.open(io.BytesIO(first)).convert("RGB"))
    labels = torch.arange(16) % TINY["num_classes"]  # the defaults: all classes in turn, batch 16, guidance 1
    np.testing.assert_array_equal(shown, _expected_grid(model, 3, batch_size=16, labels=labels, num_steps=10))
    assert first == again and first != other
    assert Image.open(tmp_path / "demo.png").size[0] >= 1280


@pytest.mark.skipif(not os.environ.get("DDPM_DEMO_SCREENSHOT"), reason="set DDPM_DEMO_SCREENSHOT=docs/demo.png")
def test_screenshot_for_docs(tiny_ckpt, tmp_path):
    """Re-take docs/demo.md's screenshot: DDPM_DEMO_CKPT (default: the tiny test model) after one generation."""
    model = DiffusionModule.from_checkpoint(os.environ.get("DDPM_DEMO_CKPT") or tiny_ckpt, "cpu")
    app, url = _start(model, tmp_path, max_batch=64)
    pw, context, _ = _browser(tmp_path)
    try:
        page = context.new_page()
        page.goto(url)
        page.locator("#generate").wait_for(timeout=30_000)
        _generate(page, seed=0)
        page.wait_for_timeout(500)  # let the images fade in
        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
    finally:
        context.close()
        pw.stop()
        app.close()
    target = Path(os.environ["DDPM_DEMO_SCREENSHOT"])
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, target)
