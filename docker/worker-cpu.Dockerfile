# syntax=docker/dockerfile:1
# The CPU model worker (llama.cpp). Models are not in the image: the worker reads
# them from GLIMPROUTER_MODELS_DIR, filled by `python -m services.worker.models
# fetch ...` (the cpu overlay's init container runs exactly that).
#   docker build -f docker/worker-cpu.Dockerfile -t registry.example.com/glimprouter/worker-cpu:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/requirements.py
# llama.cpp is compiled here. GGML_NATIVE=OFF: for any x86-64-v3 CPU (AVX2),
# not only the build machine's. On arm64 build with --build-arg LLAMA_CMAKE_ARGS=-DGGML_NATIVE=OFF.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
RUN python docker/requirements.py > /tmp/requirements.txt \
 && python -m venv /opt/venv \
 && CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY services services
COPY gateway gateway
COPY cli cli
COPY evaluation evaluation
COPY genproto genproto
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps .

FROM ${PYTHON_IMAGE}
# libgomp: llama.cpp's OpenMP threads.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 glimprouter \
 && useradd --system --uid 10001 --gid glimprouter --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin glimprouter
# pip stays in the venv: the model fetcher downloads wheels with it.
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 50061
ENTRYPOINT ["python", "-m", "services.worker"]
