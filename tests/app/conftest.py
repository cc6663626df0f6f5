"""Fixtures: a test_vit backbone checkpoint, a store of three non-identity adapters, images."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import timm
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from torch import nn

from adapters import RLRRConfig, add_rlrr, merge_rlrr, save_adapter
from app.main import create_app
from app.settings import Settings
from trainer.mini_vtab import SHARED_DATA

BACKBONE = "test_vit"
REPO = Path(__file__).resolve().parents[2]
ANT = "hymenoptera/val/ants/10308379_1b6c72e180.jpg"
BEE = "hymenoptera/val/bees/1032546534_06907fe3b3.jpg"
TASKS = {  # name -> (classes, method)
    "alpha": (5, "rlrr"),
    "beta": (3, "ssf"),
    "gamma": (7, "rlrr"),
}


@dataclass
class Reference:
    """A task's merged model, computed directly (the oracle served answers must equal)."""

    merged: nn.Module
    labels: list[str]

    def probs(self, image: bytes) -> torch.Tensor:
        """Softmax probabilities of one encoded image, with timm's eval transform."""
        transform = create_transform(**resolve_data_config({}, model=self.merged), is_training=False)
        x = transform(Image.open(io.BytesIO(image)).convert("RGB"))[None]
        with torch.no_grad():
            return self.merged(x).softmax(-1)[0]


def make_adapter(backbone_state: dict[str, torch.Tensor], num_classes: int, method: str, seed: int) -> nn.Module:
    """An add_rlrr'ed test_vit on the given weights, with every trainable tensor perturbed.

    Args:
        backbone_state: Frozen backbone weights.
        num_classes: Classes of the task head.
        method: RLRRConfig preset.
        seed: Seed of the perturbation.
    """
    model = timm.create_model(BACKBONE, pretrained=False)
    model.load_state_dict(backbone_state)
    add_rlrr(model, RLRRConfig.preset(method), num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-identity: otherwise merged == unmerged == base proves nothing
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


@pytest.fixture(scope="package", autouse=True)
def _one_flushed_thread() -> Iterator[None]:
    # Reference forwards of these random tiny ViTs underflow to denormals, which crawl on x86 CPU
    # worker threads (~0.5 s per image instead of 10 ms); one flushed thread keeps the suite fast.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rlrr")


@pytest.fixture(scope="session")
def backbone_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)
    return {k: v.clone() for k, v in timm.create_model(BACKBONE, pretrained=False).state_dict().items()}


@pytest.fixture(scope="session")
def checkpoint(workdir: Path, backbone_state: dict[str, torch.Tensor]) -> Path:
    path = workdir / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone_state.items()}, str(path))
    return path


@pytest.fixture(scope="session")
def built_store(workdir: Path, backbone_state: dict[str, torch.Tensor]) -> tuple[Path, dict[str, Reference]]:
    store, refs = workdir / "store", {}
    for seed, (name, (classes, method)) in enumerate(TASKS.items()):
        model = make_adapter(backbone_state, classes, method, seed)
        labels = [f"{name}-class-{i}" for i in range(classes)]
        save_adapter(model, store / name, base_model=BACKBONE, labels=labels,
                     metadata={"metrics": {"top1": 0.5 + seed / 10}})
        refs[name] = Reference(merge_rlrr(model).eval(), labels)
    return store, refs


@pytest.fixture
def store(built_store: tuple[Path, dict[str, Reference]], tmp_path: Path) -> Path:
    """A private copy of the store, so a test may upload and delete."""
    return Path(shutil.copytree(built_store[0], tmp_path / "store"))


@pytest.fixture(scope="session")
def refs(built_store: tuple[Path, dict[str, Reference]]) -> dict[str, Reference]:
    return built_store[1]


@pytest.fixture
def make_settings(store: Path, checkpoint: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values = dict(backbone=BACKBONE, checkpoint=checkpoint, store=store, device="cpu", max_wait_ms=2.0,
                      admin_token="s3cret", preprocess_workers=2)
        return Settings(**{**values, **overrides})  # type: ignore[arg-type]

    return make


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as c:
        yield c


def _png(seed: int, size: tuple[int, int] = (200, 180), fmt: str = "PNG") -> bytes:
    """A random-noise image, encoded.

    Args:
        seed: Seed of the pixels.
        size: (width, height).
        fmt: PIL format name.
    """
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def png() -> Callable[..., bytes]:
    """`png(seed, size=(w, h), fmt="PNG")`: a random-noise image, encoded."""
    return _png


def scores_of(result: dict) -> dict[str, float]:
    """label -> score of one image result of a /classify answer."""
    return {p["label"]: p["score"] for p in result["predictions"]}


@pytest.fixture(scope="session")
def scores() -> Callable[[dict], dict[str, float]]:
    """`scores(result)`: label -> score of one image result."""
    return scores_of


@pytest.fixture
def make_upload(tmp_path: Path, backbone_state: dict[str, torch.Tensor]) -> Callable[..., Path]:
    """`make_upload(classes=4, seed=7, state=None)`: a saved adapter folder, ready to upload."""

    def make(classes: int = 4, seed: int = 7, state: dict[str, torch.Tensor] | None = None) -> Path:
        model = make_adapter(state or backbone_state, classes, "rlrr", seed)
        labels = [f"up-{i}" for i in range(classes)]
        return save_adapter(model, tmp_path / f"upload-{seed}-{classes}", base_model=BACKBONE, labels=labels)

    return make


def free_port() -> int:
    """A loopback port nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(env: dict[str, str], log: Path) -> Iterator[str]:
    """A real `python -m app` (uvicorn) on a free loopback port, until ready; yields its base URL.

    Args:
        env: RLRR_* settings (host and port are set here).
        log: Where the server's output goes.
    """
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env, "RLRR_HOST": "127.0.0.1", "RLRR_PORT": str(port)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90  # a start-up bound, not a performance assertion
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server never became ready:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def in_thread(app) -> Iterator[int]:  # noqa: ANN001 - any ASGI app
    """Run `app` under a real uvicorn in this process, on a free port; yields the port."""
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="session")
def serving() -> Callable[..., AbstractContextManager[int]]:
    """`with serving(app) as port:` the app under a real uvicorn thread (keep-alive, timeouts, disconnects)."""
    return in_thread


@pytest.fixture(scope="session")
def start_server() -> Callable[[dict[str, str], Path], AbstractContextManager[str]]:
    """`with start_server(env, log) as url:` a real server (see `live_server`)."""
    return live_server


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`make serve`'s configuration (in-house backbone, a copy of demo/store) as a real server; its URL."""
    root = tmp_path_factory.mktemp("demo-server")
    store = shutil.copytree(REPO / "demo" / "store", root / "store")  # never write the repo
    env = {"RLRR_STORE": str(store), "RLRR_DEVICE": "cpu", "RLRR_ADMIN_TOKEN": "", "RLRR_PREPROCESS_WORKERS": "2"}
    with live_server(env, root / "server.log") as url:
        yield url


def _photo(member: str) -> bytes:
    archive = SHARED_DATA / "hymenoptera.tar"
    if not archive.is_file():
        pytest.fail(f"{archive} is missing: the shared data sets live in ../shared/data")
    with tarfile.open(archive) as tar:
        data = tar.extractfile(member)
        assert data is not None, member
        return data.read()


@pytest.fixture(scope="session")
def ant_photo() -> bytes:
    """A real ant photo (JPEG) from hymenoptera/val."""
    return _photo(ANT)


@pytest.fixture(scope="session")
def bee_photo() -> bytes:
    """A real bee photo (JPEG) from hymenoptera/val."""
    return _photo(BEE)
