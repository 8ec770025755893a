"""A trace as each server spells it, and the wrk Lua script that sends it.

Each request's path is split around a cache-busting value that changes nothing in the output: for imgsvc a
background `bg` (used only to flatten alpha into JPEG, so inert for WebP; unlike `v`, part of the variant
cache key), `?v=` for thumbor (query ignored), a `v_` modifier for ipx (ignored). The value is the run's
epoch, plus for distinct-URL traces the number of times the list has wrapped.
"""

from __future__ import annotations

import json

from peers.servers import Server
from peers.workloads import LUA_THREAD_IDS

from traces.corpus import Original
from traces.traffic import Request, Trace

WRK_THREADS = 2  # measure.WRK runs `wrk -t2`
DEFAULT_QUALITY = 80  # imgsvc's WebP and JPEG default: left out of its URLs (outside the unsigned qualities)


def split_path(server: Server, req: Request, original: Original) -> tuple[str, str]:
    """(before, after) the bust value of this request's path on `server`."""
    if server.ids:  # imgsvc
        crop = f"&h={req.height}&fit=cover" if req.height else ""
        quality = f"&q={req.quality}" if req.quality != DEFAULT_QUALITY else ""
        return f"/img/{server.ids[original.file]}?w={req.width}{crop}&fmt={req.fmt}{quality}&bg=", ""
    if server.name == "thumbor":  # both sizes given: thumbor crops to fill, centred
        return (
            f"/unsafe/{req.width}x{req.height or 0}/filters:format({req.fmt}):quality({req.quality})"
            f"/{original.file}?v=",
            "",
        )
    if server.name == "ipx":  # s_WxH: sharp's default fit, cover
        size = f"s_{req.width}x{req.height}" if req.height else f"w_{req.width}"
        return f"/{size},f_{req.fmt},q_{req.quality},v_", f"/{original.file}"
    raise ValueError(f"no URL dialect for {server.name}")


def _hex(server: Server) -> bool:
    """imgsvc's bust is a colour: six hex digits."""
    return bool(server.ids)


def path(server: Server, req: Request, original: Original, bust: int) -> str:
    before, after = split_path(server, req, original)
    return f"{before}{bust:06x}{after}" if _hex(server) else f"{before}{bust}{after}"


def lua_script(server: Server, trace: Trace, corpus: list[Original], epoch: int) -> str:
    """wrk sends the trace from a per-epoch offset, the wrk threads taking alternate entries in order."""
    pairs = [split_path(server, req, corpus[req.original]) for req in trace.requests]
    table = ",\n".join(f"{{{json.dumps(a)}, {json.dumps(b)}}}" for a, b in pairs)
    wraps = "0" if trace.repeats else "math.floor(i / n)"
    return (
        f"local paths = {{\n{table}\n}}\nlocal n = #paths\n"
        + LUA_THREAD_IDS
        + f"""function request()
  local i = {epoch * 211 % len(pairs)} + counter * {WRK_THREADS} + tid
  counter = counter + 1
  local p = paths[i % n + 1]
  local b = {epoch} * 1000 + {wraps}
  return wrk.format("GET", p[1] .. {'string.format("%06x", b)' if _hex(server) else "b"} .. p[2])
end
"""
    )
