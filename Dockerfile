# canary-proxy container image.
#
#   docker build -t canary-proxy .
#
# Both stages start FROM the same base so the venv's interpreter symlink
# (/opt/venv/bin/python3 -> the base's python3) is valid in the final stage.
# BASE_IMAGE: an official python:3.11+ slim image, or a Debian image with
# python3 (>= 3.11) and python3-venv but not python3-pip, whose pip dpkg owns
# (CI builds FROM a local debootstrap'd bookworm, as no registry is reachable).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder

# Offline builds: put wheels of the project and all its dependencies in a
# directory of the build context (`pip wheel --wheel-dir wheels .`) and pass
# --build-arg WHEELS_DIR=wheels. Left empty, pip installs from PyPI.
ARG WHEELS_DIR=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY . .

# pip compiles the bytecode now (the root filesystem is read-only at run time);
# then the venv drops its build tools, pip and setuptools. The official Kubernetes
# client is 75 MB of generated source (a sync and an asyncio copy of every model),
# 126 MB with its bytecode: it is kept as bytecode only (52 MB), and its import is
# checked here, since no other build step loads it.
RUN python3 -m venv /opt/venv \
    && if [ -n "${WHEELS_DIR}" ]; then \
           /opt/venv/bin/pip install --no-index --find-links "/src/${WHEELS_DIR}" canary-proxy; \
       else \
           /opt/venv/bin/pip install /src; \
       fi \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && /opt/venv/bin/python -m compileall -q -b -j 0 /opt/venv/lib/python3*/site-packages/kubernetes \
    && find /opt/venv/lib/python3*/site-packages/kubernetes -name '*.py' -delete \
    && find /opt/venv/lib/python3*/site-packages/kubernetes -name __pycache__ -type d -prune -exec rm -rf {} + \
    && /opt/venv/bin/python -c 'import kubernetes.aio.client, kubernetes.aio.config' \
    && /opt/venv/bin/canary-proxy --version


FROM ${BASE_IMAGE}

# The base's own pip, setuptools and wheel are build tools the proxy never runs.
RUN if python3 -m pip --version >/dev/null 2>&1; then \
        python3 -m pip uninstall --yes --no-cache-dir pip setuptools wheel; \
    fi

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Numeric, so Kubernetes' runAsNonRoot can verify it without an /etc/passwd entry.
USER 10001:10001

EXPOSE 8080 9090
ENTRYPOINT ["canary-proxy"]
CMD ["serve", "--configmap", "canary-proxy", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9090"]
