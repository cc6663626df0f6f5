"""The container files: compose parses with the GPU reservation, health check and profiles."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _gpu_devices(service: dict) -> list[dict]:
    return service["deploy"]["resources"]["reservations"]["devices"]


@pytest.mark.parametrize("name", ["app", "trainer"])
def test_gpu_reservation(compose, name) -> None:
    (device,) = _gpu_devices(compose["services"][name])
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]


def test_app_service(compose) -> None:
    app = compose["services"]["app"]
    assert "/readyz" in " ".join(app["healthcheck"]["test"])
    assert any(port.endswith(":8000") for port in app["ports"])
    assert app["environment"]["HF_HOME"] == "/data/hf"
    assert {"store:/data/store", "hf-cache:/data/hf"} <= set(app["volumes"])
    assert "profiles" not in app  # starts with a plain `docker compose up`
    assert {"store", "hf-cache"} <= set(compose["volumes"])


def test_profiles(compose) -> None:
    services = compose["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    assert services["trainer"]["profiles"] == ["train"]
    # `compose run trainer ARGS` replaces `command`: the program must be the entrypoint
    assert services["trainer"]["entrypoint"] == ["python", "-m", "trainer"]
    assert services["trainer"]["image"] == services["app"]["image"]
    assert any(v.endswith(":/data/datasets:ro") for v in services["trainer"]["volumes"])
    assert services["trainer"]["environment"]["RLRR_DATA"] == "/data/datasets"


def test_compose_base_image_is_the_dockerfiles(compose) -> None:
    # One default base, an overridable build arg: `RLRR_BASE_IMAGE=... docker compose build`
    dockerfile = re.search(r"^ARG BASE_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    arg = compose["services"]["app"]["build"]["args"]["BASE_IMAGE"]
    assert arg == f"${{RLRR_BASE_IMAGE:-{dockerfile}}}"


def test_cpu_override_drops_only_the_gpu_reservation() -> None:
    text = (ROOT / "deploy" / "compose.cpu.yml").read_text()
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!reset", lambda _loader, _node: "RESET")
    cpu = yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    assert cpu["services"] == {"app": {"deploy": "RESET"}, "trainer": {"deploy": "RESET"}}


def test_default_backbone_is_not_pinned_in_compose(compose) -> None:
    # Empty = the package default (the demo adapters' backbone), so compose cannot drift from it.
    assert compose["services"]["app"]["environment"]["RLRR_BACKBONE"] == "${RLRR_BACKBONE:-}"


def test_prometheus_scrapes_the_app() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["app:8000"]


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\S+-cuda\S+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert text.rstrip().endswith('CMD ["python", "-m", "app"]')
