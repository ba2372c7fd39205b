"""Serve the API: `python -m api` (uvicorn with uvloop and httptools, WORKERS processes)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from urllib.error import URLError
from urllib.request import urlopen

import uvicorn

from api.configs import load_settings


def port_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on, or None when it can.

    uvicorn would find out only after the lifespan has connected everything, then log
    the error among the start-up and shut-down lines and exit with 3; checked first,
    a taken port is one line and exit code 1.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve HOST {host!r}: {exc.strerror}"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # What asyncio's server sets too: a port in TIME_WAIT is not "taken".
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                return f"cannot listen on {host}:{port}: {reason.lower()} (set PORT or HOST)"
    return None


# `make run` sets it: once /ping answers, say where everything is (on stderr: stdout
# carries the JSON log lines).
BANNER_VARIABLE = "ORDERS_API_BANNER"
BANNER_WAIT_SECONDS = 120.0


def base_url(host: str, port: int) -> str:
    """The URL a local client uses for `host:port` (a wildcard address means loopback)."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def banner(url: str) -> str:
    rows = (
        ("API", f"{url}/v1"),
        ("Docs", f"{url}/docs"),
        ("ReDoc", f"{url}/redoc"),
        ("OpenAPI", f"{url}/openapi.json"),
        ("AsyncAPI", f"{url}/asyncapi.json"),
        ("Metrics", f"{url}/metrics"),
    )
    return "orders-api is ready\n" + "".join(f"  {name:<9} {link}\n" for name, link in rows)


def _announce_when_ready(url: str) -> None:
    deadline = time.monotonic() + BANNER_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            with urlopen(f"{url}/ping", timeout=1) as response:  # noqa: S310 (our own URL)
                ready = response.status == 200
        except (URLError, OSError):
            ready = False  # not serving yet
        if ready:
            sys.stderr.write(banner(url))
            sys.stderr.flush()
            return
        time.sleep(0.2)


def main() -> None:
    settings = load_settings()
    problem = port_problem(settings.HOST, settings.PORT)
    if problem is not None:
        sys.stderr.write(f"orders-api: {problem}\n")
        raise SystemExit(1)
    if settings.WORKERS > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers share their metrics through files in one directory.
        directory = tempfile.mkdtemp(prefix="orders-api-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    if os.environ.get(BANNER_VARIABLE):
        url = base_url(settings.HOST, settings.PORT)
        threading.Thread(target=_announce_when_ready, args=(url,), daemon=True).start()
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
