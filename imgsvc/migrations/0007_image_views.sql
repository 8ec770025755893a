-- View counts per image and UTC day, added to in batches by every replica and by `imgsvc views ingest`.
CREATE TABLE image_views (
    image_id       text        NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    day            date        NOT NULL,  -- UTC
    views          bigint      NOT NULL CHECK (views > 0),
    last_viewed_at timestamptz NOT NULL,  -- the latest view counted into this row
    PRIMARY KEY (image_id, day)
);

-- Where `imgsvc views ingest` stands in each access log it follows: the file (device and inode) and the offset
-- after the last line counted, committed in the same transaction as the counts of the lines before it; and the
-- file's first bytes, so a log truncated and grown past the offset again is recognised.
CREATE TABLE view_log_offsets (
    source     text PRIMARY KEY,  -- the log's path, or --source
    device     bigint      NOT NULL,
    inode      bigint      NOT NULL,
    position   bigint      NOT NULL CHECK (position >= 0),
    head       bytea       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
