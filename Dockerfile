# digitflow's serving images, from one file. `make image` (slim) first collects the wheels of the
# base dependencies on the host into build/wheelhouse/slim (deps/ and app/); `make image-full`
# collects those of the `train` extra too (torch, full MLflow) into build/wheelhouse/full and
# passes WHEELHOUSE. Nothing here reaches a package index (--no-index).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
ARG WHEELHOUSE=build/wheelhouse/slim
COPY ${WHEELHOUSE}/deps /wheelhouse/deps
RUN python -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir --no-index --no-deps \
        /wheelhouse/deps/*.whl

# digitflow itself goes to its own prefix, so a code change rebuilds a small layer, not the venv.
FROM deps AS app
ARG WHEELHOUSE=build/wheelhouse/slim
COPY ${WHEELHOUSE}/app /wheelhouse/app
RUN /opt/venv/bin/python -m pip install --no-cache-dir --no-index --no-deps --target /opt/app \
        /wheelhouse/app/*.whl \
    && PYTHONPATH=/opt/app /opt/venv/bin/python -m pip check

# The venv as it runs: nothing installs at run time, so pip and setuptools go (~25 MB). Built from
# `deps`, not `app`, so a code change does not touch it either.
FROM deps AS venv
RUN /opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools

FROM ${BASE_IMAGE}
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --home-dir /home/app --create-home \
        --shell /usr/sbin/nologin app
COPY --from=venv /opt/venv /opt/venv
COPY --from=app /opt/app /opt/app
COPY deploy/docker/entrypoint.sh /usr/local/bin/digitflow-entrypoint
# Everything written at run time goes under /tmp, so the root filesystem can be read-only
# (Kubernetes mounts an emptyDir there): the ONNX export cache ($XDG_CACHE_HOME/digitflow), ONNX
# Runtime's and MLflow's own files. Pulled runs go to PRED_MODELS_DIR. Logging: the package's
# conf/logging.yaml (LOGGER_CONFIG_PATH unset), the same file as outside the image.
ENV PATH="/opt/app/bin:/opt/venv/bin:${PATH}" \
    PYTHONPATH=/opt/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/app \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1 \
    PORT=8080 \
    PRED_MODELS_DIR=/home/app/models
WORKDIR /home/app
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8080'), timeout=2)"]
ENTRYPOINT ["digitflow-entrypoint"]
CMD ["serve"]
# Last, so a new revision does not invalidate the cached layers above.
ARG VERSION=unknown
ARG GIT_REVISION=unknown
LABEL org.opencontainers.image.title="digitflow" \
      org.opencontainers.image.description="MNIST digit classifier served by FastAPI under gunicorn" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_REVISION}"
