"""Image records cached for `record_ttl`, and when to trust them: delete tombstones, the trust epoch, outages."""

from __future__ import annotations

import time
from dataclasses import dataclass

from cachetools import TTLCache

from imgsvc.catalog import Catalog, DeleteNotice, ImageRecord
from imgsvc.errors import NotFound, Unavailable


@dataclass(frozen=True, slots=True)
class RecordStamp:
    """When a record was read and under which trust epoch: what it rendered is trusted no longer than it."""

    looked_up: float  # time.monotonic()
    epoch: int


class RecordCache:
    """Records by image id, trusted only while deletes reach this replica (the delete listener is up).

    A delete leaves a tombstone for as long as a record could be cached, so that a lookup which raced it cannot
    put the record back; each time trust returns the epoch moves on, as deletes may have been missed meanwhile.
    """

    def __init__(self, ttl: float, maxsize: int = 50_000) -> None:
        self.ttl = ttl
        self.records: TTLCache[str, ImageRecord] = TTLCache(maxsize=maxsize, ttl=ttl)
        self.deleted: TTLCache[str, bool] = TTLCache(maxsize=maxsize, ttl=ttl)
        # Blobs whose last live image was deleted, so that a render of them in flight keeps no decoded pixels.
        self.orphaned: TTLCache[str, bool] = TTLCache(maxsize=maxsize, ttl=ttl)
        self.trusted = False
        self.epoch = 0

    def stamp(self) -> RecordStamp:
        return RecordStamp(time.monotonic(), self.epoch)

    def still_trusted(self, stamp: RecordStamp, image_id: str) -> bool:
        """Whether what was read at `stamp` may still be served: no delete since, no listener outage since."""
        return (
            self.trusted
            and stamp.epoch == self.epoch
            and stamp.looked_up + self.ttl > time.monotonic()
            and image_id not in self.deleted
        )

    async def lookup(self, catalog: Catalog, image_id: str) -> ImageRecord:
        image = self.records.get(image_id) if self.trusted else None
        if image is None:
            if not catalog.available and image_id in self.records:  # known down: no wait for its timeout
                return self._outage_record(image_id)
            try:
                image = await catalog.get(image_id)
            except Unavailable:
                return self._outage_record(image_id)
            if image is None or image_id in self.deleted:
                self.records.pop(image_id, None)
                raise NotFound(f"no image {image_id!r}")
            if self.trusted:
                self.records[image_id] = image
        return image

    def _outage_record(self, image_id: str) -> ImageRecord:
        """While the database is unreachable: the record read less than `ttl` ago, else 503.

        No delete can commit here meanwhile; one committed elsewhere whose notification never arrived (just
        before the outage, or across a partition) is served at most until `ttl` after that last read.
        """
        image = self.records.get(image_id)
        if image is None or image_id in self.deleted:
            raise Unavailable("the database is unavailable and this image was not read recently; retry later")
        return image

    def forget(self, notice: DeleteNotice) -> str | None:
        """Tombstone a deleted image; the sha256 of its blob if that was the blob's last live image, else None."""
        self.deleted[notice.image_id] = True
        record = self.records.pop(notice.image_id, None)
        sha256 = notice.sha256 or (record.sha256 if record is not None else None)
        if sha256 is None or not notice.blob_orphaned:
            return None
        self.orphaned[sha256] = True
        return sha256

    def orphaned_by_delete(self, image: ImageRecord) -> bool:
        """Whether `image` was deleted (here or elsewhere) and took its blob's last live reference with it."""
        return image.id in self.deleted and image.sha256 in self.orphaned

    def trust(self, trusted: bool) -> bool:
        """Called by the delete listener; True when trust returns, so that everything derived must be dropped."""
        fresh = trusted and not self.trusted
        if fresh:
            self.records.clear()
            self.epoch += 1
        self.trusted = trusted
        return fresh
