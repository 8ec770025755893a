# imgsvc: a slim image with libvips from the pyvips-binary wheel (no distro libvips and its
# ImageMagick/poppler/librsvg dependencies). The scaled-out deployment (external Postgres and
# S3, nginx in front) is configured through IMGSVC_* variables; see README.md. Until delegated
# auth lands, IMGSVC_AUTH=none only allows a loopback bind, so this image serves loopback only.
FROM python:3.11-slim-bookworm AS build
RUN python -m venv /opt/venv
COPY pyproject.toml README.md /src/
COPY imgsvc /src/imgsvc
RUN /opt/venv/bin/pip install --no-cache-dir '/src[embedded]'

FROM python:3.11-slim-bookworm
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin imgsvc \
 && mkdir -p /data && chown imgsvc /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VIPS_BLOCK_UNTRUSTED=1 \
    IMGSVC_DATA_DIR=/data
USER 10001
VOLUME /data
EXPOSE 8080
CMD ["imgsvc", "serve"]
