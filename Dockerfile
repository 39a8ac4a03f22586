# One image for both processes; the command picks one:
#   docker run -p 8000:8000 --env-file .env IMAGE                          # web (default)
#   docker run --env-file .env IMAGE hrflow-webhooks worker                # worker
# BASE_IMAGE: only `make test-docker` overrides it, where the registry is unreachable.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000 \
    WEB_CONCURRENCY=1

WORKDIR /app

# Dependencies first, from the lock file (exact versions, hashes checked): code changes do
# not reinstall them.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock

COPY pyproject.toml README.md ./

# The product's packages; sandbox/ (the HrFlow double for tests and `make run`) stays out.
COPY hrflow_webhooks ./hrflow_webhooks
COPY hrflow_client ./hrflow_client
COPY receiver ./receiver
COPY workers ./workers
COPY control ./control
RUN pip install --no-deps . \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin app

USER app
EXPOSE 8000

# web: the receiver's /healthz; worker: `hrflow-webhooks check` (Redis, a live worker, queue age).
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
  CMD if grep -q uvicorn /proc/1/cmdline; then python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "http://127.0.0.1:${PORT}/healthz"; else hrflow-webhooks check; fi

# The Procfile's web line (control.commands.WEB; tests/test_deploy.py checks they agree).
# exec: uvicorn is PID 1 and gets SIGTERM itself, so running requests finish on stop.
CMD ["sh", "-c", "exec uvicorn receiver.app:create_app --factory --http receiver.protocol:HttpProtocol --host 0.0.0.0 --port \"${PORT}\" --proxy-headers --no-access-log --workers \"${WEB_CONCURRENCY}\""]
