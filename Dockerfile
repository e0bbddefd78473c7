# One image for every role of atomo; the command picks it: `atomo serve`, `atomo ps`, `atomo worker`.
#
# Default build (GPU workers):  docker build -t atomo .
#   The base is Debian bookworm's Python 3.11 image, and torch is PyPI's default Linux x86_64 wheel: the CUDA
#   build, which brings the CUDA runtime, cuDNN and NCCL as nvidia-* wheels, so the node only has to provide
#   the NVIDIA driver (the device plugin / container toolkit mounts it). A CUDA base image would add a second
#   copy of those libraries.
# CPU build:  docker build -t atomo:cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Offline build (no index at all): put every wheel, torch's and the project's dependencies' included, in a
#   folder under .docker-cache/wheels/ (the only cache folder .dockerignore lets in) and pass
#   --build-arg WHEELS=.docker-cache/wheels; scripts/docker-image.sh does this with a base made by debootstrap.
#
# BASE must provide python3 (3.10 or later) with its venv module. Every stage uses it, so the virtual
# environment made in the first one runs unchanged in the last.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS deps
# The torch to install: a pip requirement (e.g. torch==2.13.0+cpu or a path under WHEELS).
ARG TORCH_SPEC=torch==2.13.0
# torchvision built for that torch (0.28.0 requires torch==2.13.0); empty: leave torchvision out.
ARG TORCHVISION_SPEC=torchvision==0.28.0
# An index for torch and torchvision only (e.g. PyTorch's CPU or CUDA 12.x index); empty: PyPI.
ARG TORCH_INDEX_URL=""
# A folder of the build context holding wheels; when set, pip installs only from it (no index).
ARG WHEELS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore

SHELL ["/bin/sh", "-eu", "-c"]

RUN python3 -m venv /opt/venv

# pyproject.toml keeps COPY's source list non-empty when WHEELS is empty; it is not used from /wheels.
COPY pyproject.toml ${WHEELS} /wheels/

RUN if [ -n "$WHEELS" ]; then set -- --no-index --find-links /wheels; \
    elif [ -n "$TORCH_INDEX_URL" ]; then set -- --index-url "$TORCH_INDEX_URL"; \
    else set --; fi; \
    /opt/venv/bin/pip install "$@" "$TORCH_SPEC" ${TORCHVISION_SPEC:+"$TORCHVISION_SPEC"}; \
    if [ -n "$TORCHVISION_SPEC" ]; then /opt/venv/bin/python -c "import torchvision"; fi

# The project's dependencies alone, with its kubernetes extra (the chart's control service runs the Kubernetes
# launcher), and dumb-init, a static PID 1 that forwards signals to the process and reaps zombies. They come
# from an empty build of pyproject.toml (without its readme line: README.md is not copied here), removed
# afterwards, so that a change to the project's code leaves this layer, and the final image's copy of
# /opt/venv, cached.
COPY pyproject.toml /deps/
RUN if [ -n "$WHEELS" ]; then set -- --no-index --find-links /wheels; else set --; fi; \
    sed -i '/^readme = /d' /deps/pyproject.toml; \
    /opt/venv/bin/pip install "$@" "/deps[kubernetes]" "dumb-init==1.2.5.post1"; \
    /opt/venv/bin/pip uninstall --yes --quiet atomo

FROM deps AS project
ARG WHEELS=""
COPY pyproject.toml README.md /src/
COPY atomo_core /src/atomo_core
COPY services /src/services
# The project alone into /opt/atomo (its packages, and bin/atomo run by /opt/venv's python).
RUN if [ -n "$WHEELS" ]; then set -- --no-index --find-links /wheels; else set --; fi; \
    /opt/venv/bin/pip install "$@" --no-deps --target /opt/atomo /src; \
    PYTHONPATH=/opt/atomo /opt/venv/bin/python -c "import torch, services.cli, atomo_core, kubernetes"

FROM ${BASE}

# The non-root user every role runs as (numeric, so runAsNonRoot can check it); its home is /tmp, a volume.
RUN groupadd --gid 10001 atomo \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin atomo \
    && mkdir -p /var/lib/atomo \
    && chown 10001:10001 /var/lib/atomo \
    && chmod 0750 /var/lib/atomo

COPY --from=deps /opt/venv /opt/venv
COPY --from=project /opt/atomo /opt/atomo

# Writable paths are volumes (the root filesystem can be read-only): /tmp (HOME and the caches),
# /var/lib/atomo (the PS's runs and checkpoints, the control service's SQLite store), /dev/shm.
ENV PATH=/opt/atomo/bin:/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/atomo \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    ATOMO_STATE_DIR=/var/lib/atomo \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /var/lib/atomo
USER 10001:10001

# control 8080; PS data 5555, control 5556, metrics 9090; worker metrics 9091.
EXPOSE 8080 5555 5556 9090 9091

ENTRYPOINT ["dumb-init", "--"]
CMD ["atomo", "--help"]
