"""`python -m app`: serve on RLRR_HOST:RLRR_PORT (default 0.0.0.0:8000) with settings from RLRR_* env vars.

    RLRR_STORE=store RLRR_ADMIN_TOKEN=secret python -m app
"""

from __future__ import annotations

import errno
import logging
import socket
import sys

import uvicorn
from pydantic import ValidationError

from adapters import BackboneError
from app.main import create_app
from app.runtime import load_backbone
from app.settings import Settings

log = logging.getLogger("app")


def check_backbone(settings: Settings) -> str | None:
    """Build the backbone once before uvicorn starts; returns a one-line reason when it cannot be had.

    A failure inside the lifespan would surface as uvicorn's traceback; this says what to set instead.
    It costs one extra backbone build (~1 s for ViT-B/16 from the local cache).

    Args:
        settings: The service settings.
    """
    if settings.checkpoint is not None and not settings.checkpoint.is_file():
        return f"RLRR_CHECKPOINT={settings.checkpoint}: no such file"
    try:
        load_backbone(settings)
    except BackboneError as e:  # unknown model or kwargs, no weights to be had, a checkpoint that does not fit
        if e.needs_weights:
            return (f"{e}: set RLRR_CHECKPOINT=FILE for local weights, or RLRR_PRETRAINED=false for a "
                    "seeded random backbone")
        return f"backbone '{settings.backbone}': {str(e).splitlines()[0]}"
    return None


def bind(settings: Settings) -> tuple[socket.socket | None, str | None]:
    """Bind RLRR_HOST:RLRR_PORT before the backbone is built; returns the socket, or a one-line reason.

    The socket is bound but not listening: until uvicorn listens on it (after warm-up) a client is
    refused, not left waiting. A port in use is found in a second, not after the warm-up.

    Args:
        settings: The service settings.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind((settings.host, settings.port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            return None, (f"port {settings.port} on {settings.host} is already in use (another server?): "
                          "stop it, or set RLRR_PORT to a free port")
        return None, f"cannot bind {settings.host}:{settings.port}: {e.strerror}"
    return sock, None


def main() -> int:
    """Read settings, configure logging, run uvicorn (one worker: one copy of the backbone)."""
    try:
        settings = Settings()
    except ValidationError as e:
        print(f"error: invalid RLRR_* setting:\n{e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock, reason = bind(settings)
    reason = reason or check_backbone(settings)
    if reason is not None:
        log.error(reason)
        return 2
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_level=settings.log_level.lower(), **UVICORN_LIMITS)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


# What uvicorn itself can bound of a hostile client. It has no deadline for a request's headers (a
# connection that never finishes them is held until the client goes): a proxy in front sets that,
# and the other limits a proxy knows better (deploy/README.md). The body's deadline is the app's
# own (RLRR_BODY_TIMEOUT_S).
UVICORN_LIMITS = {
    "timeout_keep_alive": 5,  # s an idle keep-alive connection is held between requests
    "limit_concurrency": 4096,  # connections + requests in progress (8x the default queue); beyond: 503 at once
    # h11, not httptools (uvicorn's pick when installed): httptools buffers a header of any size
    # (131 MB of one header line were taken in a test), h11 refuses beyond this many bytes.
    "http": "h11",
    "h11_max_incomplete_event_size": 16 * 1024,  # bytes of request line + headers buffered (400 beyond)
    "backlog": 2048,  # connections waiting to be accepted
    "timeout_graceful_shutdown": 30,  # s open connections get to finish on SIGTERM
    "server_header": False,  # no "server: uvicorn" version banner
}


if __name__ == "__main__":
    sys.exit(main())
