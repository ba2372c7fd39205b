"""Log lines are plain JSON: no ANSI colour escapes from uvicorn's records."""

from __future__ import annotations

import json
import logging

from api.helpers.logger import JsonFormatter


def test_json_log_lines_carry_no_ansi_colour_escapes() -> None:
    # What uvicorn logs: the plain message, plus `color_message` with ANSI escapes.
    record = logging.makeLogRecord(
        {
            "name": "uvicorn.error",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "Uvicorn running on %s (Press CTRL+C to quit)",
            "args": ("http://127.0.0.1:8000",),
            "color_message": "Uvicorn running on \x1b[1m%s\x1b[0m (Press CTRL+C to quit)",
        }
    )
    line = JsonFormatter().format(record)
    assert "\x1b" not in line
    assert "\\u001b" not in line
    parsed = json.loads(line)
    assert "color_message" not in parsed
    assert parsed["message"] == "Uvicorn running on http://127.0.0.1:8000 (Press CTRL+C to quit)"
