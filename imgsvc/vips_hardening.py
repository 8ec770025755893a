"""libvips hardened for untrusted input: version check, loader allow-list, no operation cache.

Follows reference/conventions.md §5; `configure_libvips()` runs once per process before any pyvips work.
"""

from __future__ import annotations

import os
import threading

import pyvips

MIN_LIBVIPS = (8, 15)  # `keep=` on savers; blocking calls are silent no-ops before 8.13

# The only loader classes left runnable (each unblocks its file/buffer/source subclasses). Everything else,
# including svg, pdf, magick, matrix/csv/vips and uhdr, stays blocked, and libvips then skips it when it
# looks for a loader: an SVG body fails with "not in a known format".
ALLOWED_LOADER_CLASSES = (
    "VipsForeignLoadJpeg",
    "VipsForeignLoadPng",
    "VipsForeignLoadWebp",
    "VipsForeignLoadNsgif",
    "VipsForeignLoadHeif",
    "VipsForeignLoadTiff",
)


_configured: str | None = None
_configuring = threading.Lock()


def configure_libvips() -> str:
    """Harden libvips for untrusted input (idempotent, thread-safe) and return its version, e.g. "8.18.7".

    Raises RuntimeError when libvips is older than 8.15.
    """
    global _configured
    with _configuring:  # a second thread must not re-block the loaders while the first has unblocked them
        if _configured is None:
            _configured = _configure()
        return _configured


def _configure() -> str:
    version = f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"
    if not pyvips.at_least_libvips(*MIN_LIBVIPS):
        raise RuntimeError(f"libvips >= {MIN_LIBVIPS[0]}.{MIN_LIBVIPS[1]} is required, found {version}")
    # VIPS_BLOCK_UNTRUSTED is read by vips_init(), which already ran on `import pyvips`: set it for child
    # processes and make the same call at run time.
    os.environ["VIPS_BLOCK_UNTRUSTED"] = "1"
    pyvips.block_untrusted_set(True)
    pyvips.operation_block_set("VipsForeignLoad", True)
    for name in ALLOWED_LOADER_CLASSES:
        pyvips.operation_block_set(name, False)
    # The operation cache only helps repeated identical calls; for a proxy it is memory and open files.
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)
    return version
