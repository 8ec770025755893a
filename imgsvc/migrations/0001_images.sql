-- The image record: one row per (owner, upload); the bytes live in the blob store under sha256.
CREATE TABLE images (
    id                text PRIMARY KEY,
    sha256            text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    owner             text        NOT NULL,
    category          text        NOT NULL DEFAULT '',
    visibility        text        NOT NULL CHECK (visibility IN ('public', 'private')),
    format            text        NOT NULL,
    width             integer     NOT NULL CHECK (width > 0),
    height            integer     NOT NULL CHECK (height > 0),
    bytes             bigint      NOT NULL CHECK (bytes > 0),
    frames            integer     NOT NULL CHECK (frames > 0),
    has_alpha         boolean     NOT NULL,
    original_filename text,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    deleted_at        timestamptz
);

-- The same owner uploading the same bytes gets the existing live image back.
CREATE UNIQUE INDEX images_owner_sha256_live ON images (owner, sha256) WHERE deleted_at IS NULL;
-- Keyset pagination of an owner's images, newest first.
CREATE INDEX images_owner_listing ON images (owner, created_at DESC, id DESC) WHERE deleted_at IS NULL;
-- Garbage collection asks whether any live image still references a blob.
CREATE INDEX images_sha256 ON images (sha256);
