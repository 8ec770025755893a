-- Every upload is its own image; only the blob is shared by content. The same owner may now hold
-- several live images of the same bytes (two gigs, an avatar also used in a post).
-- (Deletes and gc ask whether a blob still has a live image through the existing images_sha256.)
DROP INDEX images_owner_sha256_live;

-- Retries of one upload are recognised by the client's Idempotency-Key (scope 'upload', kept 24 h) or by
-- an import's source (scope 'import', kept until the owner's import is done with: no expiry).
CREATE TABLE idempotency_keys (
    owner       text        NOT NULL,
    scope       text        NOT NULL CHECK (scope IN ('upload', 'import')),
    key         text        NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint text        NOT NULL,               -- sha256 of the request: bytes, options, filename
    claim       text        NOT NULL,               -- the request that holds it while image_id is NULL
    image_id    text        REFERENCES images (id), -- NULL while the first request is in progress
    claimed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at  timestamptz,                        -- NULL: never
    PRIMARY KEY (owner, scope, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at) WHERE expires_at IS NOT NULL;
