"""What a real browser sees: headless Chromium loads a page served by nginx whose images come from imgsvc
through nginx on another origin (so CORS, CORP and COEP all apply): <img>, srcset with sizes, <picture>
with AVIF/WebP sources and a fmt=auto image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.browser import Browser
from tests.conftest import FLICKR, ServerProcess
from tests.nginx_process import NginxProcess

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>imgsvc in a browser</title><link rel="icon" href="data:,">
<style>
  body {{ margin: 0; font: 14px sans-serif; }}
  .row {{ display: flex; gap: 8px; align-items: flex-start; }}
  #responsive {{ width: 100vw; display: block; }}
  .fixed {{ width: 92px; }}
</style></head>
<body>
<h1>imgsvc through nginx</h1>
<div class="row">
  <img id="plain" class="fixed" src="{base}?w=256&fmt=jpeg" alt="plain">
  <picture>
    <source type="image/avif" srcset="{base}?w=256&fmt=avif">
    <source type="image/webp" srcset="{base}?w=256&fmt=webp">
    <img id="picture" class="fixed" src="{base}?w=256&fmt=jpeg" alt="picture">
  </picture>
  <img id="auto" class="fixed" src="{base}?w=256&fmt=auto" alt="auto">
  <img id="cors" class="fixed" crossorigin="anonymous" src="{base}?w=128&fmt=webp" alt="cors">
</div>
<img id="responsive" alt="responsive" sizes="100vw" src="{base}?w=640&fmt=webp"
     srcset="{base}?w=256&fmt=webp 256w, {base}?w=640&fmt=webp 640w, {base}?w=1080&fmt=webp 1080w">
</body></html>
"""

LOADED = """Promise.all([...document.images].map(i => i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; })))
  .then(() => Object.fromEntries([...document.images].map(i => [i.id, {w: i.naturalWidth, src: i.currentSrc}])))"""


class PageNginx(NginxProcess):
    """The shipped template, plus one location serving the test page (with COEP, so CORP is enforced)."""

    def __init__(self, *args: object, page_dir: Path, **kwargs: str) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.page_dir = page_dir

    def write_config(self) -> Path:
        conf = super().write_config()
        page = (f"location /demo/ {{ alias {self.page_dir}/; "
                "add_header Cross-Origin-Embedder-Policy require-corp always; }\n        location /img/ {")  # fmt: skip
        conf.write_text(conf.read_text().replace("location /img/ {", page, 1))
        return conf


@pytest.fixture
def browser() -> Iterator[Browser]:
    chromium = Browser().start()
    yield chromium
    chromium.stop()


def test_every_image_loads_in_the_format_and_width_the_browser_chose(
    server: ServerProcess, nginx_bin: str, browser: Browser, tmp_path: Path
) -> None:
    page_dir = tmp_path / "page"
    page_dir.mkdir()
    nginx = PageNginx(nginx_bin, tmp_path / "nginx", f"127.0.0.1:{server.port}", page_dir=page_dir).start()
    try:
        created = httpx.post(f"{nginx.url}/images", content=FLICKR.read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert created.status_code == 201, created.text
        image_id = created.json()["id"]
        # The page is on 127.0.0.1, the images on localhost: another origin, as with a CDN.
        base = f"http://localhost:{nginx.port}/img/{image_id}"
        (page_dir / "index.html").write_text(PAGE.format(base=base))

        browser.open(f"{nginx.url}/demo/index.html", width=400, height=900)
        images = browser.evaluate(LOADED)
        screenshot = browser.screenshot(tmp_path / "browser.png")

        assert all(image["w"] > 0 for image in images.values()), images
        assert images["plain"]["w"] == 256 and "fmt=jpeg" in images["plain"]["src"]
        assert "fmt=avif" in images["picture"]["src"]  # Chromium takes the first <source> it supports
        assert "w=640" in images["responsive"]["src"]  # 400 CSS px at DPR 1: the smallest candidate >= 400
        assert images["responsive"]["w"] == 400  # density-corrected: 640 px delivered for a 400 px slot
        responses = browser.responses()
        assert responses[f"{base}?w=256&fmt=avif"]["mimeType"] == "image/avif"
        auto = responses[f"{base}?w=256&fmt=auto"]
        assert auto["mimeType"] == "image/avif" and auto["headers"].get("vary", auto["headers"].get("Vary")) == "Accept"
        assert responses[f"{base}?w=128&fmt=webp"]["mimeType"] == "image/webp"
        assert browser.console_errors() == []
        assert screenshot.stat().st_size > 10_000
    finally:
        nginx.stop()


def test_a_narrow_high_dpi_viewport_picks_a_larger_candidate(
    server: ServerProcess, nginx_bin: str, browser: Browser, tmp_path: Path
) -> None:
    page_dir = tmp_path / "page"
    page_dir.mkdir()
    nginx = PageNginx(nginx_bin, tmp_path / "nginx", f"127.0.0.1:{server.port}", page_dir=page_dir).start()
    try:
        created = httpx.post(f"{nginx.url}/images", content=FLICKR.read_bytes(), headers={"Content-Type": "image/jpeg"})
        base = f"http://localhost:{nginx.port}/img/{created.json()['id']}"
        (page_dir / "index.html").write_text(PAGE.format(base=base))
        browser.open(f"{nginx.url}/demo/index.html", width=400, height=900, scale=2)
        images = browser.evaluate(LOADED)
        assert "w=1080" in images["responsive"]["src"]  # 400 CSS px x DPR 2 = 800 device px -> 1080w
        assert browser.console_errors() == []
    finally:
        nginx.stop()
