# One image for every role of the service, chosen by the command:
#   python -m api              the HTTP API (the default)
#   python -m api.worker       outbox relay + status consumer + retention sweep
#   alembic upgrade head       the migration job
#   python -m api.rpc_echo S   the reference RPC responder for service S
# No healthcheck here: two of those roles serve no HTTP; the compose file and the
# Kubernetes manifests probe the two that do, each on its own port.
#
# Builds with the classic builder and BuildKit alike (no `# syntax=` frontend to pull,
# no BuildKit-only flags).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
# uv at a pinned version, from PyPI: the same uv.lock resolution on every build.
ARG UV_VERSION=0.13.9
RUN python -m pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_NO_CACHE=1
WORKDIR /app
# The dependencies first: this layer is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project
COPY alembic.ini ./
COPY migrations ./migrations
COPY api ./api
# Bytecode at build time: the root filesystem is read-only at run time.
RUN python -m compileall -q api migrations

FROM ${PYTHON_IMAGE} AS runtime
# A fixed numeric id, so Kubernetes' runAsNonRoot can check it without a passwd lookup.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin app
WORKDIR /app
# Owned by root and not writable by the service user.
COPY --from=builder /app /app
ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    WORKER_PORT=8001
USER 10001:10001
EXPOSE 8000 8001
CMD ["python", "-m", "api"]
