"""nginx nodes as purge targets: each keeps a deny-list of deleted image ids (nginx/imgsvc.conf.template, DENY_LIST).

A node that started afresh has lost its list and serves no cache hit until the deletes of its window are re-sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

import asyncpg
import httpx

log = logging.getLogger("imgsvc.purge")
FEED_PATH = "/_imgsvc/deleted"
SYNC_SECONDS = 0.5  # how often the sender asks each node whether it started afresh (it bypasses its cache until then)
BATCH = 10_000  # ids per request: ~230 KB, under the node's 4 MB body limit
TIMEOUT = 2.0  # seconds per request to a node: a silent node is retried soon instead of holding its queue


@dataclass(frozen=True, slots=True)
class NodeState:
    """What a node's feed answers: its epoch (new at every start), whether this epoch was re-sent the recent
    deletes, and how long it keeps a deleted id (its cache validity + a margin)."""

    epoch: str
    synced: bool
    window: float


def feed_request(base: str, key: str, ids: Sequence[str], sync: str = "") -> tuple[str, dict[str, str], bytes]:
    """(url, headers, body) of the POST adding `ids`; with `sync`, the node marks that epoch synced."""
    url = base.rstrip("/") + FEED_PATH + (f"?sync={quote(sync, safe='')}" if sync else "")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "text/plain"}
    return url, headers, "".join(f"{image_id}\n" for image_id in ids).encode()


def _state(response: httpx.Response) -> NodeState:
    response.raise_for_status()
    body = response.json()
    return NodeState(str(body["epoch"]), body["synced"] is True, float(body["window"]))


async def node_state(client: httpx.AsyncClient, base: str, key: str) -> NodeState:
    url, headers, _ = feed_request(base, key, ())
    return _state(await client.get(url, headers=headers, timeout=TIMEOUT))


async def resync(client: httpx.AsyncClient, pool: asyncpg.Pool, base: str, key: str, state: NodeState) -> int:
    """Send every image deleted within the node's window, the last batch marking `state.epoch` synced; the ids sent.
    A delete committed after the query reaches the node through its delivery queue; a node that restarted again
    meanwhile has a new epoch and stays unsynced until the next round."""
    rows = await pool.fetch(
        "SELECT DISTINCT image_id FROM purge_jobs WHERE created_at > clock_timestamp() - make_interval(secs => $1)",
        state.window,
    )
    ids = [row["image_id"] for row in rows]
    batches = [ids[i : i + BATCH] for i in range(0, len(ids), BATCH)] or [[]]
    for number, batch in enumerate(batches, 1):
        url, headers, body = feed_request(base, key, batch, state.epoch if number == len(batches) else "")
        after = _state(await client.post(url, headers=headers, content=body, timeout=TIMEOUT))
    if not after.synced:
        raise RuntimeError(f"restarted again during the re-send (epoch {state.epoch} -> {after.epoch})")
    return len(ids)


async def keep_synced(client: httpx.AsyncClient, pool: asyncpg.Pool, base: str, key: str) -> None:
    """While this replica is the sender: re-send the recent deletes to the node whenever it reports a new epoch."""
    failing = False
    while True:
        try:
            state = await node_state(client, base, key)
            if not state.synced:
                sent = await resync(client, pool, base, key, state)
                log.info("nginx %s (epoch %s) re-sent %d deletes of its %g s window", base, state.epoch, sent,
                         state.window)  # fmt: skip
            if failing:
                log.info("nginx %s answers again", base)
            failing = False
        except Exception as exc:  # the node or the database is away (or the pool's Unavailable): ask again soon
            if not failing:
                log.warning("nginx %s: deny-list not synced (%r)", base, exc)
            failing = True
        await asyncio.sleep(SYNC_SECONDS)
