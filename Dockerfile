# syntax=docker/dockerfile:1
#
# Container image for the Rekognition ingest worker: `python -m worker <subcommand>`
# (run | migrate | backfill | report | demo). Default command: `run`.
#
# Build:  docker build -t rekognition-ingest-worker:$(git describe --always) .
# Run:    docker run --rm --read-only --tmpfs /tmp -e DATABASE_URL=... -e QUEUE_URL=... \
#           rekognition-ingest-worker:TAG            # or: ... TAG migrate
#
# Base image: pinned to an exact CPython patch release on an exact Debian release. It is NOT
# pinned by digest because the digest could not be resolved where this file was written (no
# registry access). Once you can, pin both stages, e.g.
#   docker buildx imagetools inspect python:3.11.13-slim-bookworm   # prints the index digest
#   FROM python:3.11.13-slim-bookworm@sha256:<digest> AS builder
# and let Renovate/Dependabot bump the patch version and digest together.
#
# Dependencies come only from requirements.lock (pip-compile --generate-hashes, see deploy/README.md):
# the builder verifies every hash while downloading/building wheels; the runtime stage installs
# from those wheels with no index at all, verifying the hashes again.

########################################################################################
# builder: wheels for every locked dependency + the project wheel. Compilers live only here.
########################################################################################
FROM python:3.11.13-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# A C toolchain for any dependency that has no wheel for the target platform. Today every
# locked dependency ships a cp311 manylinux wheel for x86_64 and aarch64, so this is insurance.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential=12.9 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Third-party dependencies first: this layer is reused until requirements.lock changes.
COPY requirements.lock ./
RUN pip wheel --require-hashes --wheel-dir /wheels -r requirements.lock

# The project itself, without dependencies (they are all in /wheels already). The wheel carries the
# migrations (as worker/migrations), so `migrate` works from any directory.
COPY pyproject.toml README.md ./
COPY worker/ ./worker/
COPY migrations/ ./migrations/
RUN pip wheel --no-deps --wheel-dir /wheels/app .

########################################################################################
# runtime: slim Python, no compilers, non-root, works with a read-only root filesystem.
########################################################################################
FROM python:3.11.13-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="rekognition-ingest-worker" \
      org.opencontainers.image.description="Ingests Amazon Rekognition Video face detection/search results into PostgreSQL" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Numeric UID/GID so Kubernetes can verify runAsNonRoot without resolving names.
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin worker

# Install from the builder's wheels only (--no-index): no network, no compiler, hashes checked
# against the lock again. pip byte-compiles while installing, as root, so the read-only image
# never needs to write .pyc files at run time.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    python -m venv "$VIRTUAL_ENV" \
    && pip install --no-index --find-links=/wheels --require-hashes -r /tmp/requirements.lock \
    && pip install --no-index --no-deps /wheels/app/*.whl \
    && pip check

# Nothing to read from the working directory: migrations are inside the installed package.
WORKDIR /tmp

# Run-time environment: nothing may be written outside /tmp (mount an emptyDir/tmpfs there).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HEALTH_PORT=8080

USER 10001:10001

# /livez, /readyz and /metrics (HEALTH_PORT).
EXPOSE 8080

# No HEALTHCHECK: Kubernetes ignores it (the Deployment has liveness/readiness probes), and the
# same image also runs one-shot `migrate`/`backfill` containers that serve no health endpoint.
ENTRYPOINT ["python", "-m", "worker"]
CMD ["run"]
