# syntax=docker/dockerfile:1
# rnnserve: gRPC model server for Keras recurrent classifiers.
#   docker build -t rnnserve .
#   docker run --stop-timeout 30 -p 8500:8500 -p 8501:8501 rnnserve                   # shipped
#   docker run --stop-timeout 30 -p 8500:8500 -v "$PWD/my-models:/models:ro" rnnserve # yours
# --stop-timeout: Docker's default of 10 s is shorter than the server's drain (--grace 20).

# ---- build: one wheel for rnnserve and one for each runtime dependency ----
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY server ./server
COPY client ./client
COPY training ./training
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---- runtime: the wheels installed, nothing to compile, no build tools ----
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    RNNSERVE_HOST=0.0.0.0 \
    RNNSERVE_PORT=8500 \
    RNNSERVE_METRICS_PORT=8501 \
    RNNSERVE_MODEL_DIR=/models \
    RNNSERVE_SESSION_SNAPSHOT=/state/sessions.bin
RUN useradd --create-home --uid 10001 --user-group rnnserve \
    && mkdir /state && chown rnnserve:rnnserve /state
# The wheels are mounted, not copied: a COPY layer would keep them in the image for good.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/rnnserve-*.whl
# Owned by root: the server only reads its models.
COPY models /models
USER 10001:10001
WORKDIR /home/rnnserve
EXPOSE 8500 8501
VOLUME ["/models", "/state"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["rnnserve", "health"]
# Exec form: rnnserve is PID 1 and gets SIGTERM itself, so it drains before it exits.
ENTRYPOINT ["rnnserve", "serve"]
