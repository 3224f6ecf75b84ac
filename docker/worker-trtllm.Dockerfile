# syntax=docker/dockerfile:1
# The GPU model worker on TensorRT-LLM, on NVIDIA's release image (CUDA, PyTorch,
# TensorRT-LLM and MPI already installed and tested together).
#   docker build -f docker/worker-trtllm.Dockerfile -t registry.example.com/glimprouter/worker-trtllm:0.1.0 .
# Model weights are not in the image: they come from a volume (k8s/overlays/gpu).
ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.0
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

# Stage 1 only packages GlimpRouter (pure Python) and lists its requirements.
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/requirements.py
COPY services services
COPY gateway gateway
COPY cli cli
COPY evaluation evaluation
COPY genproto genproto
# The `trtllm` extra (tensorrt-llm) is in the list: the image's own TensorRT-LLM
# satisfies it, so pip keeps it, and pip fails the build if another requirement
# conflicts with TensorRT-LLM's pins. llama-cpp-python is the CPU backend: left out.
RUN python docker/requirements.py --extra trtllm --exclude llama-cpp-python > requirements.txt \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${TRTLLM_IMAGE}
COPY --from=build /src/requirements.txt /tmp/glimprouter/requirements.txt
COPY --from=build /wheels /tmp/glimprouter/wheels
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir -r /tmp/glimprouter/requirements.txt \
 && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --no-deps /tmp/glimprouter/wheels/*.whl \
 && rm -rf /tmp/glimprouter \
 && groupadd --system --gid 10001 glimprouter \
 && useradd --system --uid 10001 --gid glimprouter --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin glimprouter
# The root filesystem is read-only in the cluster: caches go to /tmp (an emptyDir).
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp XDG_CACHE_HOME=/tmp/.cache
USER 10001:10001
EXPOSE 50061
ENTRYPOINT ["python3", "-m", "services.worker"]
