"""Run the benchmark: `uv run python -m bench` (what `make bench` calls)."""

from bench.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
