-- What imgsvc derives from a blob once, off the request path (the pyramid of reduced sources and the
-- placeholder), keyed like the blob: images sharing bytes share the work. A worker leases a pending row for
-- a bounded time, so a crash or restart leaves it to be taken again once the lease lapses.
CREATE TABLE derivations (
    sha256        text        PRIMARY KEY,
    state         text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
    attempts      integer     NOT NULL DEFAULT 0,
    leased_until  timestamptz,
    levels        integer[]   NOT NULL DEFAULT '{}',  -- scales (1/n) of the stored levels
    error         text,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX derivations_pending ON derivations (created_at) WHERE state = 'pending';
