# syntax=docker/dockerfile:1
#
# stellagw container image (docs/operations.md, "Container image").
#
#   docker build -t stellaops/gateway:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9443:9443 \
#       -v "$PWD/gateway.yaml:/etc/stellagw/gateway.yaml:ro" -v "$PWD/certs:/certs:ro" \
#       stellaops/gateway:0.1.0
#
# Two stages. The builder has a C compiler and turns the source tree into wheels: stellagw's
# own (with the Cython extensions of cext/ compiled in) and every dependency's. The runtime
# stage installs those wheels offline and carries no compiler, no source tree and no pip cache.
# Both stages must use the same base image: the compiled extensions are built against its
# Python and glibc.
#
# BuildKit is required (the default builder since Docker 23): the runtime stage reads the
# builder's wheels through a bind mount, so they never become a layer of the final image.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the build reads (.dockerignore keeps generated C, *.so and caches out, so the
# extensions are always compiled here, from the .pyx sources, for this image).
COPY pyproject.toml setup.py README.md ./
COPY cext/ cext/
COPY stellagw/ stellagw/

# `pip wheel .` runs setup.py's build_ext (Cython from [build-system].requires, in an
# isolated build environment) and collects every runtime dependency as a wheel too.
# The check fails the build when stellagw's wheel came out pure-Python (py3-none-any),
# i.e. when no extension was compiled.
RUN pip wheel --wheel-dir /wheels . \
 && ls /wheels/stellagw-*-cp311-cp311-*.whl

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ARG STELLAGW_UID=10001
ARG STELLAGW_GID=10001

LABEL org.opencontainers.image.title="stellagw" \
      org.opencontainers.image.description="Stella Ops Gateway" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# A fixed, numeric, non-root identity: Kubernetes' runAsNonRoot can only verify a numeric
# USER, and the manifests (deploy/kubernetes/deployment.yaml) pin the same UID/GID.
RUN groupadd --system --gid "${STELLAGW_GID}" stellagw \
 && useradd --system --uid "${STELLAGW_UID}" --gid "${STELLAGW_GID}" \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin stellagw \
 && mkdir -p /etc/stellagw /certs

# Install offline from the builder's wheels, then prove at build time that the image works:
# the compiled extensions load (no silent fall-back to the pure-Python twins), httptools can
# be made strict (the gateway refuses to start otherwise), and the CLI runs.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels stellagw \
 && python -c "from stellagw import _impl; missing = _impl.not_compiled(); \
assert not missing, f'compiled modules missing: {missing}'" \
 && python -c "from stellagw.gateway import check_httptools_strict; check_httptools_strict()" \
 && stellagw --version

# pip compiled the bytecode above; at run time nothing tries to write beside the sources
# (the root filesystem is read-only in Kubernetes). Logs are JSON lines on stdout.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Configuration: /etc/stellagw/gateway.yaml (a ConfigMap in Kubernetes). Certificates:
# /certs (Secrets). The image ships no configuration: a missing file stops start-up with
# exit code 2 and a one-line message naming it.
#
# The root filesystem may be read-only. The gateway writes only to $TMPDIR (default /tmp):
# with several workers the per-worker metrics snapshots, and a PKCS#12 certificate's
# transient PEM copy. Mount a small writable volume there (an emptyDir in Kubernetes).
USER ${STELLAGW_UID}:${STELLAGW_GID}

# 8080 HTTP(S) for clients (and /health/live|ready); 9090 the admin listener when
# gateway.admin.port is set to it (probes, /metrics, /openapi.json); 9100 plain-TCP service
# transport (development); 9443 TLS service transport. With gateway.node.workers > 1 each
# worker also listens on a private, OS-picked transport port (docs/protocol.md §4.2); those
# cannot be listed here, services reach them on the pod IP.
EXPOSE 8080 9090 9100 9443

# SIGTERM drains: readiness 503, listeners closed gateway.node.preStopDelay later, DRAIN to
# services, in-flight requests get gateway.http.shutdownTimeout to finish
# (docs/operations.md, "Draining"). The stellagw process
# is PID 1 and installs its own SIGTERM/SIGINT handlers, and the supervisor (workers > 1)
# reaps every child, so no init shim is needed.
STOPSIGNAL SIGTERM

# No HEALTHCHECK: Kubernetes ignores it (the manifests use /health/live, /health/ready and
# /health/startup probes), and the listener's scheme and port come from the configuration, so
# an image-level check would have to guess them.

ENTRYPOINT ["stellagw"]
CMD ["serve", "--config", "/etc/stellagw/gateway.yaml"]
