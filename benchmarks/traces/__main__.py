"""Origin-traffic traces: imgsvc (and variants of its settings) against thumbor and ipx on 120 originals.

Run: `cd benchmarks && ../.venv/bin/python -m traces` (part of `make bench`: 3 rounds of 20 s), or faster
`../.venv/bin/python -m traces --seconds 8 --rounds 3 --traces bursts,cold`. Add imgsvc variants to measure
other settings in the same run: `--imgsvc 'name:IMGSVC_X=1,VIPS_CONCURRENCY=1'` (repeatable).
Writes results/traces.md (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from peers import install, servers

from traces import report
from traces.corpus import build
from traces.run import Results, Variant, check, run_cell, start
from traces.traffic import traces

RESULTS = Path(__file__).resolve().parents[1] / "results" / "traces.md"
RAW = Path(__file__).resolve().parents[1] / ".traces" / "last-run.json"  # every run's figures, for a second look
DEFAULT_VARIANTS = (
    Variant("imgsvc", "imgsvc"),
    Variant("imgsvc, decoded cache off", "imgsvc", (("IMGSVC_DECODED_CACHE_BYTES", "0"),)),
    Variant("thumbor", "thumbor"),
    Variant("ipx", "ipx"),
)


def parse_variant(text: str) -> Variant:
    """`name:K=V,K=V` -> an imgsvc variant with those environment variables."""
    name, _, pairs = text.partition(":")
    env = tuple((k, v) for k, _, v in (pair.partition("=") for pair in pairs.split(",") if pair))
    return Variant(name, "imgsvc", env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--connections", type=lambda s: [int(c) for c in s.split(",")], default=[8, 32])
    parser.add_argument("--traces", default="bursts,cold,thumbnails,zipf")
    parser.add_argument("--imgsvc", type=parse_variant, action="append", default=[], help="name:K=V,K=V")
    parser.add_argument("--no-peers", action="store_true", help="imgsvc and its variants only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    began = time.monotonic()
    versions = {} if args.no_peers else install.install()
    corpus = build()
    chosen = [t for t in traces(corpus) if t.key in args.traces.split(",")]
    variants = [v for v in DEFAULT_VARIANTS if not (args.no_peers and v.kind != "imgsvc")] + args.imgsvc
    results = Results()
    shutil.rmtree(servers.LOGS, ignore_errors=True)
    servers.LOGS.mkdir(parents=True)
    started: list[servers.Server] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        try:
            for variant in variants:
                if "error" in versions.get(variant.kind, {}):
                    results.problems[variant.name] = f"not installed: {versions[variant.kind]['error'][:300]}"
                    continue
                server = start(variant, tmp, corpus)
                started.append(server)
                check(server, chosen, corpus, results)
            live = [s for s in started if s.name not in results.problems]
            for server in live:  # warm-up: 3 s of each trace's start at 8 connections
                for trace in chosen:
                    run_cell(server, trace, corpus, 8, 3, 0, tmp, Results())
            epoch = 0
            for rnd in range(args.rounds):
                print(f"round {rnd + 1}/{args.rounds}", flush=True)
                order = live[rnd % len(live) :] + live[: rnd % len(live)]
                for trace in chosen:
                    for c in args.connections:
                        epoch += 1
                        for server in order:
                            run_cell(server, trace, corpus, c, args.seconds, epoch, tmp, results)
        finally:
            for server in reversed(started):
                server.stop()
    RAW.parent.mkdir(exist_ok=True)
    RAW.write_text(json.dumps({"runs": {"|".join(map(str, k)): [asdict(r) for r in v] for k, v in results.runs.items()},
                               "hits": {"|".join(map(str, k)): v for k, v in results.hits.items()},
                               "sample": results.sample, "problems": results.problems}))  # fmt: skip
    text = report.markdown(results, variants, chosen, corpus, versions, args, (time.monotonic() - began) / 60)
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
