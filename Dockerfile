# nnserve images, one Dockerfile, three targets (see docs/deployment.md):
#
#   docker build --target cpu   -t nnserve:cpu   .   # ONNX Runtime on the CPU (the default target)
#   docker build --target gpu   -t nnserve:gpu   .   # ONNX Runtime + CUDA 12 (or --build-arg CUDA_MAJOR=13) + cuDNN 9
#   docker build --target train -t nnserve:train .   # one-shot training (torch, torchvision, onnx)
#
# Serving images hold no torch: the ONNX backend needs only ONNX Runtime. Add the TorchScript backend with
# `--build-arg EXTRAS=torchscript`. Each image's dependencies are installed from its own requirements (derived
# from pyproject.toml) before any source is copied, so editing code, models or other extras reuses the cached
# dependency layers. No `# syntax=` line and no BuildKit-only instruction: BuildKit and the classic builder build
# the same images, and nothing but the base image is pulled (air-gapped hosts pass a mirror or stand-in base as
# PYTHON_IMAGE).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# uid/gid of the image's non-root user `nnserve`: match the owner of a mounted models folder that `train` writes.
ARG APP_UID=1000
ARG APP_GID=1000
# CUDA major of the GPU image's NVIDIA wheels: 12 (driver >= R525, what most GPU hosts run) or 13 (driver >= R580).
ARG CUDA_MAJOR=12

# ---------------------------------------------------------------------------------------------------------
# Dependencies: a virtual environment in /opt/venv per image, from that image's requirements only.
# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /build

# One requirements file per image, derived from pyproject.toml. Each deps-* stage copies only its own file, and a
# COPY is cached by content: editing pyproject.toml elsewhere (a dev tool, package data) reinstalls nothing,
# where copying pyproject.toml itself would reinstall train's 6 GB for any edit (3 minutes on 2 cores).
FROM deps AS requirements
ARG EXTRAS=""
ARG CUDA_MAJOR
COPY pyproject.toml ./
# `requirements.py EXTRA...` prints the project's dependencies plus those of the named extras (the project
# itself is not installed: its source runs from /app). onnxruntime-gpu's own `cuda` and `cudnn` extras pull the
# CUDA runtime, cuBLAS, cuFFT, cuRAND, NVRTC and cuDNN wheels that its release was built against, so the
# libraries can never drift from it; PyPI's onnxruntime-gpu is built for CUDA 12 up to 1.26, CUDA 13 from 1.27.
RUN printf '%s\n' \
      'import sys, tomllib' \
      'project = tomllib.load(open("pyproject.toml", "rb"))["project"]' \
      'extras = [e for arg in sys.argv[1:] for e in arg.split(",") if e]' \
      'print("\n".join(project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]))' \
      > requirements.py \
    && python requirements.py serve cpu "${EXTRAS}" > cpu.txt \
    && python requirements.py serve gpu "${EXTRAS}" > gpu.txt \
    && case "${CUDA_MAJOR}" in \
      12) echo "onnxruntime-gpu[cuda,cudnn]<1.27" ;; \
      13) echo "onnxruntime-gpu[cuda,cudnn]>=1.27" ;; \
      *) echo "CUDA_MAJOR must be 12 or 13, not ${CUDA_MAJOR}" >&2; exit 1 ;; \
    esac >> gpu.txt \
    && python requirements.py train cpu > train.txt

# PIP_EXTRA_INDEX_URL (read by pip from the environment): another package index beside PyPI, e.g. a local mirror,
# or https://download.pytorch.org/whl/cpu for a CPU-only torch in `train` (without ~3 GB of CUDA wheels).
FROM deps AS deps-cpu
ARG PIP_EXTRA_INDEX_URL
COPY --from=requirements /build/cpu.txt requirements.txt
RUN pip install -r requirements.txt \
    && if pip show --quiet onnxruntime-gpu; then echo "onnxruntime-gpu must not be in the CPU image" >&2; exit 1; fi \
    && python -c "import onnxruntime; print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"

FROM deps AS deps-gpu
ARG PIP_EXTRA_INDEX_URL
COPY --from=requirements /build/gpu.txt requirements.txt
RUN pip install -r requirements.txt \
    && if pip show --quiet onnxruntime; then echo "plain onnxruntime must not be in the GPU image" >&2; exit 1; fi \
    && python -c "import onnxruntime; print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"

FROM deps AS deps-train
ARG PIP_EXTRA_INDEX_URL
# `cpu` beside `train`: the exported ONNX files are checked against ONNX Runtime after training.
COPY --from=requirements /build/train.txt requirements.txt
RUN pip install -r requirements.txt \
    && if pip show --quiet onnxruntime-gpu; then echo "onnxruntime-gpu must not be in the train image" >&2; exit 1; fi

# ---------------------------------------------------------------------------------------------------------
# Runtime base: slim Python, a non-root user, the code in /app, the model repository in /models.
# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID
ARG APP_GID
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NNSERVE_MODELS_DIR=/models
RUN test "${APP_UID}" -ne 0 \
    && { getent group "${APP_GID}" >/dev/null || groupadd --gid "${APP_GID}" nnserve; } \
    && useradd --uid "${APP_UID}" --gid "${APP_GID}" --create-home --shell /usr/sbin/nologin nnserve \
    && install -d -o "${APP_UID}" -g "${APP_GID}" /models /data
WORKDIR /app

# ---------------------------------------------------------------------------------------------------------
# train: `python -m training <digits|cifar|sequence> --data-dir /data --out /models --device auto`
# ---------------------------------------------------------------------------------------------------------
FROM runtime AS train
ARG APP_UID
ARG APP_GID
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MPLBACKEND=Agg
COPY --from=deps-train /opt/venv /opt/venv
COPY models/*.py /app/models/
COPY training/ /app/training/
USER ${APP_UID}:${APP_GID}
ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------------
# gpu: ONNX Runtime's CUDA provider; NNSERVE_DEVICE=auto falls back to the CPU when no GPU is usable.
# ---------------------------------------------------------------------------------------------------------
FROM runtime AS gpu
ARG APP_UID
ARG APP_GID
ARG CUDA_MAJOR
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=deps-gpu /opt/venv /opt/venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The CUDA provider dlopen()s libcudart, libcublas, libcudnn... by soname: register the wheels' lib folders
# with the dynamic loader (found at build time, so any layout of NVIDIA's wheels works).
RUN find /opt/venv -type d -path '*/site-packages/nvidia/*/lib' > /etc/ld.so.conf.d/nvidia-pip-wheels.conf \
    && test -s /etc/ld.so.conf.d/nvidia-pip-wheels.conf \
    && ldconfig \
    && ldconfig -p | grep -q 'libcudnn\.so' \
    && ldconfig -p | grep -q "libcudart\\.so\\.${CUDA_MAJOR}\\b"
# The model package (manifest schema) goes to /app/models, the model repository to /models.
COPY models/*.py /app/models/
COPY service/ /app/service/
COPY models/ /models/
USER ${APP_UID}:${APP_GID}
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('NNSERVE_PORT', '8000') + '/health', timeout=4)"]
CMD ["python", "-m", "service"]

# ---------------------------------------------------------------------------------------------------------
# cpu (default target, last in the file): ONNX Runtime on the CPU, never onnxruntime-gpu.
# ---------------------------------------------------------------------------------------------------------
FROM runtime AS cpu
ARG APP_UID
ARG APP_GID
COPY --from=deps-cpu /opt/venv /opt/venv
COPY models/*.py /app/models/
COPY service/ /app/service/
COPY models/ /models/
USER ${APP_UID}:${APP_GID}
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('NNSERVE_PORT', '8000') + '/health', timeout=4)"]
CMD ["python", "-m", "service"]
