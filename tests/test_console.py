"""The console page: off unless enabled (on for `make run`'s setup), strict CSP and self-contained; in headless
Chromium with a pasted main-app token: upload, grid, render builder, snippets, delete with confirmation."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import pytest

from imgsvc.cli import with_local_console
from imgsvc.config import Settings
from tests.browser import Browser, running_browser
from tests.conftest import (
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    FLICKR,
    REPO,
    MainApp,
    ServerProcess,
    app_client,
    with_settings as changed,
)

CONSOLE_DIR = REPO / "imgsvc" / "console"
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
browser_fixture = pytest.fixture(running_browser, name="browser")
WATCH_PROGRESS = """window.progressSeen = [];
new MutationObserver(() => progressSeen.push(document.getElementById('progress-text').textContent))
  .observe(document.getElementById('progress-text'), {childList: true, characterData: true, subtree: true})"""
DROP_A_PNG = """(async () => {
  const canvas = Object.assign(document.createElement('canvas'), {width: 300, height: 200});
  const pen = canvas.getContext('2d');
  pen.fillStyle = '#1e90ff';
  pen.fillRect(0, 0, 300, 200);
  const blob = await new Promise(done => canvas.toBlob(done, 'image/png'));
  const files = new DataTransfer();
  files.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
  document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: files, bubbles: true,
                                                                       cancelable: true}));
})()"""
# Random hashes (landscape without alpha, portrait with) and pixels of them decoded by a line-by-line port of
# the reference decoder (github.com/evanw/thumbhash), pixel index -> RGBA; the page's decoder matched it exactly.
REFERENCE_THUMBHASHES = [
    ("OLRmVORNp/I3DZ4mDicTZVCko6bQf1wMMy+LEiQIP9IrkC+JEegYGA==", 32, 18,
     {0: [0, 0, 132, 255], 304: [255, 255, 255, 255], 575: [0, 151, 251, 255]}),
    ("WTCmPDizcKG1dp+g8Ug/lakNnfLxMNYPzwS9k/UK5pUU2oxlnOKxDA==", 26, 32,
     {0: [0, 0, 0, 152], 429: [0, 43, 139, 255], 831: [239, 0, 255, 0]}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("host", "database_url", "storage_url", "console", "expected"),
    [
        ("127.0.0.1", None, None, None, True),  # make run
        ("::1", None, None, None, True),
        ("0.0.0.0", None, None, None, False),
        ("127.0.0.1", "postgresql://db/imgsvc", None, None, False),
        ("127.0.0.1", None, "s3://bucket/prefix", None, False),
        ("127.0.0.1", None, None, False, False),  # IMGSVC_CONSOLE=false wins
        ("0.0.0.0", "postgresql://db/imgsvc", None, True, True),
    ],
)
def test_the_console_is_on_for_make_runs_setup_and_else_only_when_asked(
    host: str, database_url: str | None, storage_url: str | None, console: bool | None, expected: bool
) -> None:
    settings = Settings(host=host, database_url=database_url, storage_url=storage_url, console=console, auth="jwks")
    assert with_local_console(settings).console is expected


def test_make_runs_setup_serves_the_console(tmp_path: Path) -> None:
    """`imgsvc serve` with the embedded defaults on loopback, as `make run` starts it: the console is there."""
    server = ServerProcess({"IMGSVC_DATA_DIR": str(tmp_path / "data"), "IMGSVC_WORKERS": "1"}, tmp_path / "run.log")
    server.start(timeout=120)
    try:
        page = httpx.get(f"{server.url}/console", timeout=30)
        assert page.status_code == 200 and "imgsvc console" in page.text
    finally:
        server.stop()
    assert f"imgsvc: console on {server.url}/console" in (tmp_path / "run.log").read_text()


async def test_the_console_is_404_unless_enabled(client: httpx.AsyncClient) -> None:
    for path in ("/console", "/console/app.js"):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("path", "media_type"),
    [("/console", "text/html"), ("/console/app.js", "text/javascript"), ("/console/thumbhash.js", "text/javascript"),
     ("/console/style.css", "text/css")],
)  # fmt: skip
async def test_console_files_are_served_with_a_strict_csp(settings: Settings, path: str, media_type: str) -> None:
    async with app_client(changed(settings, console=True)) as client:
        response = await client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"].split(";")[0] == media_type
        assert response.headers["content-security-policy"] == CSP
        assert response.headers["x-content-type-options"] == "nosniff"
        again = await client.get(path, headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert (await client.get("/console/missing.js")).status_code == 404
        assert (await client.get("/console/..%2Fapp.py")).status_code == 404


def test_the_console_is_self_contained_and_has_no_inline_script_or_style() -> None:
    html = (CONSOLE_DIR / "index.html").read_text()
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html))
    assert not re.search(r"\son[a-z]+=|\sstyle=|<style", html)
    for path in CONSOLE_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//|url\(["']?(https?:)?//|@import|@font-face""", text), path
        assert "eval(" not in text and "innerHTML" not in text, path


def thumbhash(l_dc: int, p_dc: int, q_dc: int, short_side: int) -> str:
    """A landscape ThumbHash without alpha whose cosine terms are all zero (scales 0): one flat colour."""
    header24 = l_dc | (p_dc << 6) | (q_dc << 12)  # L scale 0, no alpha
    header16 = short_side | (1 << 15)  # P and Q scales 0, landscape
    data = header24.to_bytes(3, "little") + header16.to_bytes(2, "little") + bytes(30)
    return base64.b64encode(data).decode()


def expected_rgb(l_dc: int, p_dc: int, q_dc: int) -> list[int]:
    lum, p, q = l_dc / 63, p_dc / 31.5 - 1, q_dc / 31.5 - 1
    b = lum - 2 / 3 * p
    r = (3 * lum - b + q) / 2
    return [round(255 * min(1.0, max(0.0, c))) for c in (r, r - q, b)]


def test_the_console_at_work_in_chromium(
    server_env: dict[str, str], main: MainApp, browser: Browser, tmp_path: Path
) -> None:
    server = ServerProcess(server_env | {
        "IMGSVC_CONSOLE": "true", "IMGSVC_AUTH": "introspect", "IMGSVC_AUTH_INTROSPECT_URL": f"{main.url}/introspect",
        "IMGSVC_AUTH_CLIENT_ID": CLIENT_ID, "IMGSVC_AUTH_CLIENT_SECRET": CLIENT_SECRET,
        "IMGSVC_AUTH_AUDIENCE": AUDIENCE,
    }, tmp_path / "server.log").start()  # fmt: skip
    token = main.token("alice")
    try:
        browser.open(f"{server.url}/console", width=1200, height=1400)
        # Auth is on and no token is pasted yet: the list answers 401 and the page says what to do.
        assert "paste a token" in browser.wait_until("document.getElementById('status').textContent")
        assert all("401" in error for error in browser.console_errors()), browser.console_errors()
        browser.events.clear()

        browser.fill("#token", token)
        browser.evaluate("document.getElementById('use-token').click()")
        browser.wait_until("document.getElementById('status').textContent.startsWith('No images yet')")
        browser.evaluate(WATCH_PROGRESS)
        browser.set_files("#file", [FLICKR])
        image_id = browser.wait_until("document.querySelector('#grid .tile')?.dataset.id")
        assert f"{FLICKR.name}: 100%" in browser.evaluate("window.progressSeen")  # the XHR's upload progress
        image = httpx.get(f"{server.url}/images/{image_id}", headers={"Authorization": f"Bearer {token}"}).json()
        assert image["original_filename"] == FLICKR.name
        browser.wait_until("document.querySelector('#grid .tile img').classList.contains('loaded')")
        assert browser.evaluate("document.querySelector('#grid .tile img').naturalWidth") == 256

        # Uploading selects the image: the builder starts at the srcset's 640w, then follows each change.
        size = "[document.getElementById('preview').naturalWidth, document.getElementById('preview').dataset.query]"
        assert browser.wait_until(f"(s => s[1] === 'w=640' && s)({size})")[0] == 640
        for name, value, query, width in [("w", "256", "w=256", 256), ("dpr", "2", "w=256&dpr=2", 512),
                                          ("fmt", "webp", "w=256&fmt=webp&dpr=2", 512)]:  # fmt: skip
            browser.fill(f'#params [name="{name}"]', value)
            assert browser.wait_until(f"(s => s[1] === {query!r} && s)({size})")[0] == width
        assert browser.evaluate("document.getElementById('fact-type').textContent") == "image/webp"
        shown_bytes = browser.evaluate("document.getElementById('fact-bytes').textContent")
        assert re.fullmatch(r"[\d,]+ bytes", shown_bytes) and int(re.sub(r"\D", "", shown_bytes)) > 1000
        assert "ms round trip" in browser.evaluate("document.getElementById('fact-time').textContent")
        snippet = browser.evaluate("document.getElementById('snippet-img').value")
        picture = browser.evaluate("document.getElementById('snippet-picture').value")
        assert f'srcset="{image["srcset"]}"' in snippet and 'type="image/avif"' in picture
        assert f"{image['urls']['render']}?w=256&fmt=avif 256w" in picture
        screenshot = browser.screenshot(tmp_path / "console.png")
        print(f"console screenshot: {screenshot}")

        # A file dropped on the drop zone is uploaded, put first in the grid and selected; a private one's
        # thumbnail and preview show too (fetched with the token).
        browser.evaluate("document.getElementById('visibility').value = 'private'")
        browser.evaluate(DROP_A_PNG)
        tiles = "[...document.querySelectorAll('#grid .tile')].map(t => t.dataset.id)"
        dropped_id, first_id = browser.wait_until(f"(t => t.length === 2 && t)({tiles})")
        assert first_id == image_id
        assert browser.wait_until("document.getElementById('builder-name').textContent").startswith("dropped.png")
        private = httpx.get(f"{server.url}/images/{dropped_id}", headers={"Authorization": f"Bearer {token}"})
        assert private.json()["visibility"] == "private"
        assert httpx.get(f"{server.url}/img/{dropped_id}?w=256").status_code == 401  # not without the token
        browser.wait_until("document.querySelector('#grid .tile img').classList.contains('loaded')")
        assert browser.evaluate("document.querySelector('#grid .tile img').naturalWidth") == 256
        assert browser.wait_until(f"(s => s[1] === 'w=256&fmt=webp&dpr=2' && s)({size})")[0] == 300  # no upscaling

        # Delete asks first: cancelling keeps the image, confirming deletes it everywhere.
        browser.evaluate("document.getElementById('delete').click()")
        assert browser.evaluate("document.getElementById('confirm').open")
        browser.evaluate("document.getElementById('confirm-cancel').click()")
        assert not browser.evaluate("document.getElementById('confirm').open")
        assert browser.evaluate(tiles) == [dropped_id, image_id]
        browser.evaluate("document.getElementById('delete').click()")
        browser.evaluate("document.getElementById('confirm-delete').click()")
        assert browser.wait_until(f"(t => t.length === 1 && t)({tiles})") == [image_id]
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{server.url}/images/{dropped_id}", headers=auth).status_code == 404
        assert httpx.get(f"{server.url}/images/{image_id}", headers=auth).status_code == 200

        # The page's ThumbHash decoder: a flat hash gives its colour over the whole 32 x 18 placeholder.
        flat = thumbhash(40, 20, 44, 4)
        decoded = browser.evaluate(f"""import('/console/thumbhash.js').then(m => {{
            const r = m.decodeThumbHash(m.base64Bytes({flat!r})), px = r.rgba;
            return {{w: r.w, h: r.h, first: [...px.slice(0, 4)], flat: px.every((v, i) => v === px[i % 4])}};
        }})""")
        assert decoded == {"w": 32, "h": 18, "first": [*expected_rgb(40, 20, 44), 255], "flat": True}
        for hash_text, width, height, pixels in REFERENCE_THUMBHASHES:
            found = browser.evaluate(f"""import('/console/thumbhash.js').then(m => {{
                const r = m.decodeThumbHash(m.base64Bytes({hash_text!r}));
                return [r.w, r.h, {list(pixels)}.map(i => [...r.rgba.slice(4 * i, 4 * i + 4)])];
            }})""")
            assert found == [width, height, list(pixels.values())]
        # A tile's placeholder: the dominant colour, and the ThumbHash as a picture over it (JSON `placeholder`).
        styles = browser.evaluate(f"""import('/console/thumbhash.js').then(m => [
            m.placeholderStyle({{dominant_color: '#123456', average_color: '#654321', thumbhash: {flat!r}}}),
            m.placeholderStyle({{dominant_color: null, average_color: null, thumbhash: null}}),
            m.placeholderStyle(undefined)])""")
        assert styles[0]["backgroundColor"] == "#123456"
        assert styles[0]["backgroundImage"].startswith('url("data:image/png;base64,')
        assert styles[1:] == [{}, {}]
        assert browser.console_errors() == []
    finally:
        server.stop()
