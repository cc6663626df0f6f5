"""`python -m app`: serve on RLRR_HOST:RLRR_PORT (default 0.0.0.0:8000) with settings from RLRR_* env vars.

    RLRR_STORE=store RLRR_ADMIN_TOKEN=secret python -m app
"""

from __future__ import annotations

import logging

import uvicorn

from app.main import create_app
from app.settings import Settings


def main() -> None:
    """Read settings, configure logging, run uvicorn (one worker: one copy of the backbone)."""
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower())


if __name__ == "__main__":
    main()
