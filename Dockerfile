# The gateway's runtime image. Build it with `scripts/build-image [TAG]`, which first makes the
# wheelhouse (build/wheelhouse) this file installs from: nothing is downloaded inside the build,
# so it builds on an air-gapped network too. Classic builder syntax only (Docker 20.10).
# What it runs and how to operate it: docs/operations.md#container.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# The gateway's user: a fixed uid, so that a bind-mounted /data can be prepared for it
# (chown 10001 /srv/gateway-data).
ARG GATEWAY_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/gateway/bin:$PATH \
    GATEWAY_CONFIG=/etc/gateway/config.toml \
    GATEWAY_LOG__FORMAT=json \
    GATEWAY_LOG__STREAM=stdout \
    MALLOC_ARENA_MAX=2

COPY build/wheelhouse /tmp/wheelhouse
# A venv from the base image's own python3 (the official image's, or Debian's python3 and
# python3-venv), filled from the wheelhouse only.
RUN python3 -m venv /opt/gateway \
    && /opt/gateway/bin/python -m pip install --no-index --no-cache-dir --disable-pip-version-check \
        --find-links /tmp/wheelhouse dicom-gateway \
    && rm -rf /tmp/wheelhouse \
    && (getent group gateway >/dev/null || groupadd --gid "$GATEWAY_UID" gateway) \
    && useradd --uid "$GATEWAY_UID" --gid gateway --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin gateway \
    && mkdir -p /data /etc/gateway \
    && chown gateway:gateway /data \
    && chmod 0750 /data

COPY deploy/gateway.toml /etc/gateway/config.toml

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# DICOM (plain), DICOM TLS (when [node] tls_port is set), metrics (when [metrics] port is set).
EXPOSE 11112 2762 9464
STOPSIGNAL SIGTERM
# The control socket answers `status` while the event loop runs; unhealthy when it does not, or
# when the node refuses instances (disk below min_free_mb).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["gateway", "health"]
# The gateway is PID 1: SIGTERM from `docker stop` reaches it directly.
ENTRYPOINT ["gateway"]
CMD ["serve"]
