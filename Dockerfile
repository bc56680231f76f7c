# syntax=docker/dockerfile:1

# One image for every service of the deployment: the dst command line and worker, the MLflow
# tracking server and optuna-dashboard. The torch wheels from PyPI bundle the CUDA libraries,
# so a container uses a GPU when it gets one (docker run --gpus, or a compose device
# reservation) and the CPU otherwise.

# Build stage: installs the pinned dependencies and the project into a virtual environment.
# Every dependency ships as a wheel for CPython 3.11 on linux/amd64, so no compiler is needed.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src
COPY docker/requirements.txt docker/requirements.txt
RUN pip install --requirement docker/requirements.txt

COPY pyproject.toml README.md ./
COPY dst dst
COPY experiments experiments
RUN pip install --no-deps .

# Final stage: the virtual environment, the study files and a non-root user, without the
# build stage's source tree and pip caches.
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg

# /app is the working folder: it holds the study files and the worker's MLflow spool
# folder. /var/lib/mlflow/artifacts is the MLflow server's artifact store and /checkpoints
# holds the workers' shared checkpoints (named volumes in docker-compose.yml take the owner
# of these folders when they are first created).
RUN useradd --create-home --uid 10001 --user-group dst \
    && mkdir -p /app /var/lib/mlflow/artifacts /checkpoints \
    && chown dst:dst /app /var/lib/mlflow/artifacts /checkpoints

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY studies studies

USER 10001:10001

EXPOSE 5000 8080
CMD ["dst", "--help"]
