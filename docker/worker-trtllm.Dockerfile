# syntax=docker/dockerfile:1
# The GPU model worker on TensorRT-LLM, on NVIDIA's release image (CUDA, PyTorch,
# TensorRT-LLM and MPI already installed and tested together).
#   docker build -f docker/worker-trtllm.Dockerfile -t registry.example.com/glimprouter/worker-trtllm:0.1.0 .
# Model weights are not in the image: they come from a volume (k8s/overlays/gpu).
#
# Where TensorRT-LLM comes from: the base image, NVIDIA's NGC release container
# (nvcr.io/nvidia/tensorrt-llm/release). Not PyPI: `pip install tensorrt-llm` there
# resolves to 1.2.1, a placeholder for which pip finds no wheel; NVIDIA publishes the
# wheels on its own index. A pip install outside this image needs
# `--extra-index-url https://pypi.nvidia.com` (docs/trtllm.md).
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
# Before pip sees the `trtllm` extra: the base image must already hold TensorRT-LLM
# >= 1.2, or pip would go looking for it on PyPI and find the placeholder.
RUN python3 -c "import importlib.metadata as md, sys; v = md.version('tensorrt_llm'); \
print('TensorRT-LLM', v, 'from the base image'); \
sys.exit(0 if tuple(int(x) for x in v.split('.')[:2]) >= (1, 2) else \
f'the base image has TensorRT-LLM {v}; the trtllm extra needs >= 1.2 (use a 1.2.x NGC release tag)')"
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
