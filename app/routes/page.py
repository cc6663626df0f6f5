"""GET /: the browser page (plain HTML, one script, one stylesheet; package files, no CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

router = APIRouter(tags=["page"], include_in_schema=False)
STATIC = Path(__file__).resolve().parent.parent / "static"
FILES = {"page.js": "text/javascript", "page.css": "text/css", "icon.svg": "image/svg+xml"}


@router.get("/", response_class=FileResponse)
async def index() -> FileResponse:
    """The page: backbone, task cards, and a form that classifies dropped, pasted or chosen images."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/static/{name}", response_class=FileResponse)
async def static(name: str) -> FileResponse:
    """One of the page's files (a fixed list: nothing else on disk is reachable)."""
    if name not in FILES:
        raise HTTPException(404, f"no page file {name!r}")
    return FileResponse(STATIC / name, media_type=FILES[name], headers={"Cache-Control": "no-cache"})
