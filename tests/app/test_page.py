"""The page at /: its files, the /tasks fields it shows, and a real headless chromium (Playwright)
against a real server with the demo store. Screenshots go to .cache/page.png and .cache/page-390.png."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, Page, expect, sync_playwright

from app.routes.page import STATIC
from app.schemas import backbone_source
from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NOT_AN_IMAGE = b"these are my notes, not a picture\n"


def test_page_and_its_files_are_served_from_the_package(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, kind in [("page.js", "text/javascript"), ("page.css", "text/css"), ("icon.svg", "image/svg+xml")]:
        assert f"/static/{name}" in page.text
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert response.content == (STATIC / name).read_bytes()
    assert client.get("/static/..%2Fmain.py").status_code == 404
    assert client.get("/static/index.html").status_code == 404  # only the listed files
    for path in STATIC.iterdir():  # offline: nothing loaded from elsewhere
        assert not re.search(r"(src|href)=\"(https?:)?//|url\(\s*['\"]?(https?:)?//|import\s", path.read_text())


def test_tasks_carry_what_the_cards_show(client: TestClient, checkpoint: Path, png) -> None:
    body = client.get("/tasks").json()
    assert body["backbone"]["source"] == "local file" and body["backbone"]["weights"] == str(checkpoint)
    gamma = next(t for t in body["tasks"] if t["name"] == "gamma")
    assert gamma["labels"] == [f"gamma-class-{i}" for i in range(7)]
    assert gamma["metrics"] == {"top1": 0.7} and gamma["parameters"] > 0 and gamma["bytes"] > 0
    assert gamma["version"] and gamma["tier"] == "stored" and gamma["loaded_at"] is None
    client.post("/classify?task=gamma", content=png(0), headers={"content-type": "image/png"})
    gamma = next(t for t in client.get("/tasks").json()["tasks"] if t["name"] == "gamma")
    assert gamma["tier"] == "resident" and gamma["loaded_at"] > 0


@pytest.mark.parametrize(("values", "expected"), [
    ({}, ("in-house", "vit_hybrid_efflite0_128.distilled.safetensors")),
    ({"backbone": "vit_pico_patch4_32.cifar5"}, ("in-house", "vit_pico_patch4_32.cifar5.safetensors")),
    ({"backbone": "vit_base_patch16_224.augreg_in21k"}, ("hub", "timm/vit_base_patch16_224.augreg_in21k")),
    ({"checkpoint": "/weights/vit.safetensors"}, ("local file", "/weights/vit.safetensors")),
    ({"backbone": "test_vit", "pretrained": False}, ("random", None)),
])
def test_backbone_source(values: dict, expected: tuple[str, str | None]) -> None:
    assert backbone_source(Settings(**values)) == expected


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open(browser: Browser, url: str, width: int) -> Page:
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(url)
    expect(page.locator("body[data-ready=true]")).to_be_attached()
    return page


def _top(url: str, image: bytes, task: str, top_k: int = 3) -> list[dict]:
    response = httpx.post(f"{url}/classify?task={task}&top_k={top_k}", content=image,
                          headers={"content-type": "image/jpeg"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["predictions"]


def test_page_classifies_a_real_photo_like_the_json_api(browser: Browser, demo_server: str, ant_photo: bytes,
                                                        bee_photo: bytes) -> None:
    page = _open(browser, demo_server, 1200)
    tasks = httpx.get(f"{demo_server}/tasks").json()
    backbone = page.locator("#backbone")
    expect(backbone).to_contain_text("vit_hybrid_efflite0_128.distilled")
    expect(backbone).to_contain_text("in-house")
    expect(backbone).to_contain_text("cpu")
    expect(backbone).to_contain_text("float32")
    expect(page.locator(".card")).to_have_count(len(tasks["tasks"]))
    card = page.locator('.card[data-task="ants-bees"]')
    recorded = next(t for t in tasks["tasks"] if t["name"] == "ants-bees")["metrics"]["test_top1"]
    expect(card).to_contain_text(f"{recorded:.1f}%")  # the recorded test top-1, as /tasks has it
    expect(card).to_contain_text("never selected on test")
    expect(card).to_contain_text("ants")
    expect(card).to_contain_text(next(t["version"] for t in tasks["tasks"] if t["name"] == "ants-bees"))
    card.click()
    expect(page.locator("#chosen")).to_have_text("ants-bees")

    page.set_input_files("#files", files=[{"name": "ant.jpg", "mimeType": "image/jpeg", "buffer": ant_photo}])
    result = page.locator(".result").first
    expect(result.locator(".prediction")).to_have_count(2)  # top 3 of a 2-class task
    expected = _top(demo_server, ant_photo, "ants-bees")
    assert result.locator(".prediction .label").all_inner_texts() == [p["label"] for p in expected]
    assert expected[0]["label"] == "ants"
    assert result.locator(".prediction .score").first.inner_text() == f"{expected[0]['score'] * 100:.1f}%"
    expect(result.locator(".time")).to_contain_text("ms in the server")
    expect(result.locator("img.thumb")).to_have_js_property("naturalWidth", 500)

    page.set_input_files("#files", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": NOT_AN_IMAGE}])
    server_says = httpx.post(f"{demo_server}/classify?task=ants-bees",
                             files={"file": ("notes.txt", NOT_AN_IMAGE, "text/plain")}).json()["detail"]
    expect(page.locator(".result.failed .error")).to_have_text(server_says)

    _drop(page, bee_photo)
    expect(page.locator(".result")).to_have_count(3)
    bee = page.locator(".result").first
    expect(bee.locator(".prediction")).to_have_count(2)
    assert bee.locator(".prediction .label").first.inner_text() == _top(demo_server, bee_photo, "ants-bees")[0]["label"]
    _screenshot(page, "page.png")


def test_page_fits_a_phone_and_works_from_the_keyboard(browser: Browser, demo_server: str, ant_photo: bytes) -> None:
    page = _open(browser, demo_server, 390)
    focused = []
    for _ in range(40):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id || document.activeElement.name || ''"))
        if focused[-1] == "files":
            break
    assert "task" in focused and focused[-1] == "files", focused
    page.locator('input[name="task"]:checked').focus()
    page.keyboard.press("ArrowDown")
    expect(page.locator("#chosen")).to_have_text(httpx.get(f"{demo_server}/tasks").json()["tasks"][1]["name"])
    page.locator('.card[data-task="ants-bees"]').click()
    page.set_input_files("#files", files=[{"name": "ant.jpg", "mimeType": "image/jpeg", "buffer": ant_photo}])
    expect(page.locator(".result .prediction")).to_have_count(2)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    _screenshot(page, "page-390.png")


@pytest.fixture(scope="module")
def many_server(tmp_path_factory: pytest.TempPathFactory, start_server) -> Iterator[str]:  # noqa: ANN001
    """The demo configuration over a store of 60 tasks (copies of the demo's ants-bees adapter)."""
    root = tmp_path_factory.mktemp("many-server")
    for i in range(60):
        shutil.copytree(REPO / "demo" / "store" / "ants-bees", root / "store" / f"task-{i:03d}")
    env = {"RLRR_STORE": str(root / "store"), "RLRR_DEVICE": "cpu", "RLRR_ADMIN_TOKEN": "",
           "RLRR_PREPROCESS_WORKERS": "2"}
    with start_server(env, root / "server.log") as url:
        yield url


def test_page_pages_and_searches_a_large_store(browser: Browser, many_server: str, ant_photo: bytes) -> None:
    page = _open(browser, many_server, 1200)
    cards = page.locator(".card")
    expect(cards).to_have_count(24)  # one page, not the whole store
    expect(page.locator("#task-count")).to_contain_text("60")
    expect(page.locator("#page-info")).to_have_text("1–24 of 60")
    expect(page.locator("#prev-page")).to_be_disabled()
    page.click("#next-page")
    expect(page.locator("#page-info")).to_have_text("25–48 of 60")
    expect(cards.first).to_have_attribute("data-task", "task-024")
    page.click("#next-page")
    expect(page.locator("#page-info")).to_have_text("49–60 of 60")
    expect(cards).to_have_count(12)
    expect(page.locator("#next-page")).to_be_disabled()
    page.click("#prev-page")
    expect(cards.first).to_have_attribute("data-task", "task-024")
    page.fill("#task-search", "task-05")
    expect(page.locator("#page-info")).to_have_text("1–10 of 10")
    expect(cards.first).to_have_attribute("data-task", "task-050")
    card = page.locator('.card[data-task="task-057"]')
    expect(card).to_contain_text("in the store")  # never asked for yet: only its config was read
    card.click()
    expect(page.locator("#chosen")).to_have_text("task-057")
    page.set_input_files("#files", files=[{"name": "ant.jpg", "mimeType": "image/jpeg", "buffer": ant_photo}])
    expect(page.locator(".result .prediction")).to_have_count(2)  # loaded on its first request
    assert httpx.get(f"{many_server}/tasks/task-057").json()["tier"] in ("resident", "folded")
    page.fill("#task-search", "nothing-like-this")
    expect(page.locator("#page-info")).to_have_text("no task")
    expect(cards).to_have_count(0)


def _drop(page: Page, image: bytes) -> None:
    """Drop a JPEG on the drop zone, as a file dragged from the desktop would arrive."""
    page.evaluate("""bytes => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], "bee.jpg", {type: "image/jpeg"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
    }""", list(image))


def _screenshot(page: Page, name: str) -> None:
    out = REPO / ".cache" / name
    out.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize("fragment", ["%E0%A4%A", "%", "%ZZ", "ants-bees%"])
def test_page_survives_a_malformed_fragment(browser: Browser, demo_server: str, fragment: str) -> None:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{demo_server}/#{fragment}")
    expect(page.locator("body[data-ready=true]")).to_be_attached()
    first = next(t["name"] for t in httpx.get(f"{demo_server}/tasks").json()["tasks"] if t["state"] == "loaded")
    expect(page.locator("#chosen")).to_have_text(first)
    assert errors == []


def test_docs_render_under_their_content_security_policy(browser: Browser, demo_server: str) -> None:
    page = browser.new_page()
    blocked: list[str] = []
    page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(f"{demo_server}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("rlrr-serve")
    expect(page.locator(".opblock").first).to_be_visible()
    page.goto(f"{demo_server}/redoc")
    expect(page.locator("h1").first).to_contain_text("rlrr-serve")
    # Only what comes from elsewhere is blocked (ReDoc's CDN logo): nothing of the server's own, no inline script.
    assert [m for m in blocked if "https://" not in m] == [], blocked
