# imgsvc container: a slim Python base, libvips from the pyvips-binary wheel (no distro libvips and
# none of its ImageMagick/poppler/librsvg dependencies), a non-root user, state in /data.
#
# It binds 0.0.0.0, so it refuses to start with IMGSVC_AUTH=none: configure delegated auth
# (IMGSVC_AUTH=introspect or jwks) and, scaled out, IMGSVC_DATABASE_URL and IMGSVC_STORAGE_URL.
# docker-compose.yml shows the whole deployment (imgsvc, Postgres, an S3 store, nginx).
FROM python:3.11-slim-bookworm AS build
RUN python -m venv /opt/venv
COPY pyproject.toml README.md /src/
COPY imgsvc /src/imgsvc
RUN /opt/venv/bin/pip install --no-cache-dir '/src[embedded]'

FROM python:3.11-slim-bookworm
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin imgsvc \
 && mkdir -p /data && chown imgsvc /data
COPY --from=build /opt/venv /opt/venv
# VIPS_CONCURRENCY: libvips threads inside each render, on top of IMGSVC_WORKERS render threads (one
# per core). Measured on 2 cores, 4000x3000 JPEG -> 256-px WebP with 2 render threads: 43.7 renders/s
# at VIPS_CONCURRENCY=2, 38.6 at 1. Set it to the container's core count.
# MALLOC_ARENA_MAX=2: glibc otherwise keeps an arena per render thread and RSS only grows.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VIPS_BLOCK_UNTRUSTED=1 \
    VIPS_CONCURRENCY=2 \
    MALLOC_ARENA_MAX=2 \
    IMGSVC_HOST=0.0.0.0 \
    IMGSVC_PORT=8080 \
    IMGSVC_DATA_DIR=/data
USER 10001
WORKDIR /data
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["imgsvc", "healthcheck"]
CMD ["imgsvc", "serve"]
