"""The workloads: five renders (W1-W5) on the shared corpus, and how a wrk Lua script varies each request.

Every render request must render. So no request repeats one in flight or in a cache: each asks for a width
cycling through target-7..target+7 (the same work for every server), plus a changing cache-busting value
that changes nothing in the output: `?v=` for thumbor (query ignored), a `v_` modifier for ipx (unknown
modifiers are ignored), and for imgsvc a bounding height `h` at least the source height (`fit=inside`
scales by `w` alone; `v` would not do, as imgsvc's single-flight key leaves `v` out on purpose).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from harness import IMAGES

# numbers each wrk thread (`tid`), so that threads can take alternate requests
LUA_THREAD_IDS = """local counter = 0
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
"""
SPREAD = 7  # widths target-SPREAD..target+SPREAD
BUSTS = 2000  # distinct cache-busting values before they repeat


@dataclass(frozen=True)
class Workload:
    key: str
    file: str
    size: tuple[int, int]  # source width, height
    width: int
    fmt: str  # webp, jpeg, avif
    quality: int

    @property
    def source(self) -> Path:
        return IMAGES / self.file

    @property
    def label(self) -> str:
        w, h = self.size
        return f"{self.key}: {w}×{h} {self.file.rsplit('.', 1)[1].upper()} → {self.width}-px {self.fmt.upper()}"

    def height(self, width: int) -> int:
        """Output height for `width` (sources are never enlarged here), rounded like libvips."""
        return round(self.size[1] * width / self.size[0])

    def path(self, template: str, width: int | None = None, bust: int = 0) -> str:
        """A server's path template filled for one request (Python side of `lua_script`)."""
        values = {"w": width or self.width, "b": bust, "h": self.size[1] + bust, "fmt": self.fmt, "q": self.quality}
        return template.format(**values, file=self.file)

    def lua_script(self, template: str) -> str:
        """A wrk script sending `template` with a cycling width and a changing bust value, per wrk thread."""
        parts = re.split(
            r"\{(w|b|h)\}", template.format(w="{w}", b="{b}", h="{h}", fmt=self.fmt, q=self.quality, file=self.file)
        )
        concat = " .. ".join(part if i % 2 else json.dumps(part) for i, part in enumerate(parts) if part)
        return (
            LUA_THREAD_IDS
            + f"""function request()
  counter = counter + 1
  local w = {self.width - SPREAD} + counter % {2 * SPREAD + 1}
  local b = (counter * 2 + tid) % {BUSTS}
  local h = {self.size[1]} + b
  return wrk.format("GET", {concat})
end
"""
        )


WORKLOADS = [
    Workload("W1", "2569067123_aca715a2ee_o.jpg", (2725, 2225), 256, "webp", 80),
    Workload("W2", "2569067123_aca715a2ee_o.jpg", (2725, 2225), 1024, "jpeg", 80),
    Workload("W3", "alpha-premultiply-2048x1536-paper.png", (2048, 1536), 256, "webp", 80),
    Workload("W4", "photo-4000x3000.jpg", (4000, 3000), 256, "webp", 80),
    # AVIF q50 for all: libvips', sharp's and imgsvc's default (Pillow's is 75); quality scales differ by encoder
    Workload("W5", "photo-4000x3000.jpg", (4000, 3000), 640, "avif", 50),
]
HIT = WORKLOADS[0]  # H1/H2 and the ceilings serve W1's variant
