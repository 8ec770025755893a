"""Measuring one server: wrk runs with the CPU and peak RSS of its process tree, output checks and SSIM.

CPU: user+system seconds of every process in the tree (psutil, from /proc) before and after the run,
divided by the requests wrk completed. RSS: the sum over the tree, sampled every 0.2 s, the peak kept (a
forked server's shared pages count once per process, as RSS does). Before each run the server is left to
finish what it still had queued (a client that hung up does not stop a render already queued).

SSIM: pyvips arithmetic (numpy is not a dependency of imgsvc's venv). Both images flattened on white,
in sRGB, as Rec.601 luma; Gaussian windows of sigma 1.5, C1 = (0.01·255)², C2 = (0.03·255)² (Wang et
al. 2004); the mean of the SSIM map. The reference is a Lanczos3 resize of the flattened source to the
output's exact size (flattening commutes with resizing, so this equals a premultiplied resize).
"""

from __future__ import annotations

import contextlib
import math
import re
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyvips

from peers.workloads import Workload

LOADERS = {"webp": "webpload", "jpeg": "jpegload", "avif": "heifload"}
WRK = ["wrk", "-t2", "--latency", "--timeout", "60s"]


def tree(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            found += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return found


def _tree_sum(pids: list[int], read: Callable[[psutil.Process], float]) -> float:
    """`read` summed over the process trees of `pids`, skipping processes that exit meanwhile."""
    total = 0.0
    for proc in tree(pids):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += read(proc)
    return total


def cpu_seconds(pids: list[int]) -> float:
    return _tree_sum(pids, lambda proc: sum(proc.cpu_times()[:2]))  # user + system


def rss_bytes(pids: list[int]) -> int:
    return int(_tree_sum(pids, lambda proc: proc.memory_info().rss))


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (steal included: the host's other guests)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def wrk_seconds() -> float:
    """CPU seconds of this harness and its waited-for children (wrk, the reference)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def quiesce(pids: list[int], timeout: float = 90.0) -> float:
    """Wait until the tree uses under 5% of a core; the seconds waited."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        before = cpu_seconds(pids)
        time.sleep(0.25)
        if cpu_seconds(pids) - before < 0.0125:
            break
    return time.monotonic() - began


class RssSeries:
    """Appends (seconds since start, the tree's RSS) to `samples` every `every` seconds while in use."""

    def __init__(self, pids: list[int], every: float, samples: list[tuple[float, int]]) -> None:
        self.pids, self.every, self.samples, self._stop = pids, every, samples, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        began = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - began, rss_bytes(self.pids)))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSeries:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class PeakRss(RssSeries):
    """The tree's peak RSS, sampled every 0.2 s while in use."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(pids, 0.2, [])

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_ms: float  # CPU milliseconds of the server tree per request
    rss_mb: float  # peak RSS of the tree
    others: float = 0.0  # cores busy with anything but the server, wrk and this harness (a noise gauge)


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk_command(url: str, connections: int, seconds: float, script: str | None) -> list[str]:
    return [*WRK, f"-c{connections}", f"-d{seconds:g}s", *(["-s", script] if script else []), url]


def wrk(url: str, connections: int, seconds: float, script: str | None, pids: list[int]) -> Run:
    quiesce(pids)
    cpu, busy, load = cpu_seconds(pids), machine_busy(), wrk_seconds()
    began = time.monotonic()
    with PeakRss(pids) as rss:
        out = subprocess.run(
            wrk_command(url, connections, seconds, script), check=True, capture_output=True, text=True
        ).stdout
    elapsed = time.monotonic() - began
    cpu = cpu_seconds(pids) - cpu  # includes the requests still in flight at the end: a slight over-estimate
    others = (machine_busy() - busy - cpu - (wrk_seconds() - load)) / elapsed
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    errors += sum(int(n) for n in sockets.groups()) if sockets else 0
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    return Run(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=_ms(p50.group(1)) if requests and p50 else math.nan,
        p99_ms=_ms(p99.group(1)) if requests and p99 else math.nan,
        requests=requests,
        errors=errors,
        cpu_ms=cpu / requests * 1000 if requests else math.nan,
        rss_mb=rss.peak / 2**20,
        others=max(others, 0.0),
    )


def median_run(runs: list[Run]) -> Run:
    """Field-wise medians over rounds; errors summed, RSS and other load the maximum of all."""

    def mid(values: Iterable[float]) -> float:
        known = [v for v in values if not math.isnan(v)]
        return statistics.median(known) if known else math.nan

    return Run(
        mid(r.rps for r in runs),
        mid(r.p50_ms for r in runs),
        mid(r.p99_ms for r in runs),
        sum(r.requests for r in runs),
        sum(r.errors for r in runs),
        mid(r.cpu_ms for r in runs),
        max(r.rss_mb for r in runs),
        max(r.others for r in runs),
    )


def check_output(data: bytes, wl: Workload) -> str:
    """'' when `data` decodes as the workload's format at the expected size (±1 px height), else what is wrong."""
    try:
        image = pyvips.Image.new_from_buffer(data, "")
    except pyvips.Error as exc:
        return f"undecodable: {str(exc).splitlines()[0]}"
    loader = str(image.get("vips-loader"))
    problems = []
    if not loader.startswith(LOADERS[wl.fmt]):
        problems.append(f"format {loader}")
    if wl.fmt == "avif" and image.get_typeof("heif-compression") and image.get("heif-compression") != "av1":
        problems.append(f"heif compression {image.get('heif-compression')}")
    if image.width != wl.width or abs(image.height - wl.height(wl.width)) > 1:
        problems.append(f"size {image.width}×{image.height}, expected {wl.width}×{wl.height(wl.width)}")
    return ", ".join(problems)


def _luma_on_white(image: pyvips.Image) -> pyvips.Image:
    if image.interpretation not in ("srgb", "b-w"):
        image = image.colourspace("srgb")
    if image.hasalpha():
        image = image.flatten(background=[255] * (image.bands - 1))
    if image.bands == 1:
        return image.cast("float")
    return (image[0] * 0.299 + image[1] * 0.587 + image[2] * 0.114).cast("float")


def ssim(data: bytes, path: Path) -> float:
    out = pyvips.Image.new_from_buffer(data, "")
    source = pyvips.Image.new_from_file(str(path))
    if source.hasalpha():
        source = source.flatten(background=[255] * (source.bands - 1))
    truth = source.resize(out.width / source.width, vscale=out.height / source.height, kernel="lanczos3")
    truth = truth.gravity("north-west", out.width, out.height, extend="copy")  # resize may round by a pixel
    x, y = _luma_on_white(out), _luma_on_white(truth)

    def blur(image: pyvips.Image) -> pyvips.Image:
        return image.gaussblur(1.5, precision="float", min_ampl=0.001)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    ssim_map = ((mx * my * 2 + c1) * (cxy * 2 + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(ssim_map.avg())
