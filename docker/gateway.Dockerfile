# syntax=docker/dockerfile:1
# The gateway image (OpenAI-compatible HTTP). Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t registry.example.com/glimprouter/gateway:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/requirements.py
# Dependencies first (a layer that survives code changes); llama.cpp is the CPU
# worker's backend and is not needed here.
RUN python docker/requirements.py --exclude llama-cpp-python > /tmp/requirements.txt \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY services services
COPY gateway gateway
COPY cli cli
COPY evaluation evaluation
COPY genproto genproto
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps .

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 glimprouter \
 && useradd --system --uid 10001 --gid glimprouter --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin glimprouter
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "gateway"]
