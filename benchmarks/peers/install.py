"""Install the peers from the registries into benchmarks/.peers/ (nothing vendored) and report their versions.

thumbor from PyPI into its own venv, ipx from npm into its own prefix. Pinned, so a rerun measures the same
code; an install that fails is recorded, not fatal. Run alone: `cd benchmarks && ../.venv/bin/python -m peers.install`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parents[1] / ".peers"
THUMBOR = "thumbor==7.8.0"  # Pillow-based; Pillow >= 11.3 wheels carry libavif, so AVIF needs no plugin
IPX = "ipx@3.1.1"  # sharp/libvips
THUMBOR_BIN = PEERS / "thumbor" / "bin" / "thumbor"
IPX_BIN = PEERS / "ipx" / "node_modules" / ".bin" / "ipx"


def _run(command: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{(done.stderr or done.stdout)[-2000:]}")
    return done.stdout.strip()


def install_thumbor() -> dict[str, str]:
    venv = PEERS / "thumbor"
    python = venv / "bin" / "python"
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", THUMBOR])
    probe = (
        "import json, PIL, thumbor; from PIL import features;"
        "print(json.dumps({'thumbor': thumbor.__version__, 'Pillow': PIL.__version__,"
        " 'libwebp': features.version('webp'), 'libavif': features.version('avif') or 'none',"
        " 'libjpeg': features.version('jpg'), 'python': '%d.%d.%d' % __import__('sys').version_info[:3]}))"
    )
    return json.loads(_run([str(python), "-c", probe]))


def install_ipx() -> dict[str, str]:
    prefix = PEERS / "ipx"
    prefix.mkdir(parents=True, exist_ok=True)
    _run(["npm", "install", "--silent", "--no-fund", "--no-audit", "--prefix", str(prefix), IPX])
    probe = (
        "const s = require('sharp'); const p = JSON.parse(require('fs').readFileSync('node_modules/ipx/package.json'));"
        "console.log(JSON.stringify({ipx: p.version, sharp: s.versions.sharp, libvips: s.versions.vips,"
        " node: process.versions.node}))"
    )
    return json.loads(_run(["node", "-e", probe], cwd=prefix))


def install() -> dict[str, dict[str, str]]:
    """{peer: versions} for each peer, or {peer: {"error": why}}."""
    found: dict[str, dict[str, str]] = {}
    for name, step in (("thumbor", install_thumbor), ("ipx", install_ipx)):
        if name == "ipx" and shutil.which("npm") is None:
            found[name] = {"error": "npm is not installed"}
            continue
        try:
            found[name] = step()
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            found[name] = {"error": str(exc)}
    return found


if __name__ == "__main__":
    print(json.dumps(install(), indent=2))
