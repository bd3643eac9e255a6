# xmodal: image-text retrieval service (FastAPI + open_clip + FAISS).
#
#   docker build -t xmodal .                                   # CUDA torch from the default index
#   docker build --build-arg TORCH_INDEX_URL=<cpu wheel index> -t xmodal:cpu .
#   docker run -p 127.0.0.1:8000:8000 -v xmodal-data:/data xmodal
#
# Layers are ordered so that changing the code re-runs only the last two steps: torch, then the
# other dependencies (read from pyproject.toml), are installed before any source is copied.

ARG BASE_IMAGE=python:3.11-slim

# --- the dependency list, extracted from pyproject.toml -------------------------------------
# Its own stage, so the install layers below are keyed on the list itself: bumping the version
# or editing tool settings in pyproject.toml does not reinstall torch.
FROM ${BASE_IMAGE} AS deps-list
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(deps))' > /requirements.txt

# --- the runtime image ---------------------------------------------------------------------
FROM ${BASE_IMAGE}

# Empty: torch/torchvision come from the default index (a CUDA build, several GiB).
# Set it to PyTorch's CPU-only wheel index for a much smaller CPU image.
ARG TORCH_INDEX_URL=""
# Requirement specifiers for the torch step, e.g. "torch==2.5.1 torchvision==0.20.1".
ARG TORCH_SPEC="torch torchvision"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A venv works the same on the official image (Python in /usr/local) and on Debian's Python
# (which refuses system-wide pip installs).
RUN python3 -m venv /opt/venv \
 && python -m pip install --upgrade pip setuptools wheel

RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        python -m pip install --index-url "$TORCH_INDEX_URL" $TORCH_SPEC; \
    else \
        python -m pip install $TORCH_SPEC; \
    fi

COPY --from=deps-list /requirements.txt /tmp/requirements.txt
RUN python -m pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

# The non-root user the server runs as; /data is its volume.
RUN groupadd --gid 10001 xmodal \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/xmodal --shell /usr/sbin/nologin xmodal \
 && mkdir -p /data \
 && chown xmodal:xmodal /data

# The code. README.m[d] is a glob so the build also works before the README exists.
WORKDIR /src
COPY pyproject.toml README.m[d] ./
COPY app ./app
COPY models ./models
COPY index ./index
RUN python -m pip install --no-deps --no-build-isolation . \
 && rm -rf /src/build /src/*.egg-info

# HF_HOME under /data: weights downloaded once survive container re-creation with the volume.
# HF_HUB_OFFLINE is deliberately not set: set HF_HUB_OFFLINE=1 on hosts without internet so a
# missing pretrained tag fails in milliseconds (mount a weights file instead; see README.md: Docker).
ENV XMODAL_DATA_DIR=/data \
    XMODAL_HOST=0.0.0.0 \
    XMODAL_PORT=8000 \
    HF_HOME=/data/hf-home

USER xmodal
WORKDIR /home/xmodal
VOLUME ["/data"]
EXPOSE 8000

# No curl in slim images: Python's urllib. Fails on connection errors and on any non-2xx
# (/readyz answers 503 until the model is warmed and the indexes are loaded).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('XMODAL_PORT', '8000'), timeout=4)"]

CMD ["xmodal", "serve"]
