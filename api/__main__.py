"""Serve the API: `python -m api` (uvicorn with uvloop and httptools, WORKERS processes)."""

from __future__ import annotations

import os
import shutil
import tempfile

import uvicorn

from api.configs import load_settings


def main() -> None:
    settings = load_settings()
    if settings.WORKERS > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers share their metrics through files in one directory.
        directory = tempfile.mkdtemp(prefix="orders-api-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        uvicorn.run(
            "api.main:create_app",
            factory=True,
            host=settings.HOST,
            port=settings.PORT,
            workers=settings.WORKERS,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_config=None,
            proxy_headers=False,
            timeout_graceful_shutdown=30,
        )
    finally:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
        if directory.startswith(tempfile.gettempdir() + "/orders-api-metrics-"):
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
