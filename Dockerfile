# syntax=docker/dockerfile:1
# The example orders service: one image for web (gunicorn), worker, beat, flower and the
# init-db job. docker-compose.yml chooses the command and supplies the environment; the
# image holds no credentials and no default command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    OUTBOX_DEMO_DIR=/app/var \
    PYTHONPATH=/app

# A fixed, unprivileged uid/gid so volume ownership is predictable.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app

WORKDIR /app

# What the wheel build needs (see [tool.hatch.build.targets.wheel] in pyproject.toml),
# and celeryconfig.py, found through PYTHONPATH.
COPY pyproject.toml README.md celeryconfig.py ./
COPY outbox/ outbox/
COPY webapp/ webapp/
COPY tasks/ tasks/

# The code stays root-owned and read-only for the app user; only var/ (beat's schedule,
# anything the embedded fallback writes) is writable.
RUN pip install --no-cache-dir ".[demo]" \
    && mkdir -p /app/var \
    && chown app:app /app/var

USER app:app

EXPOSE 8000 5555
