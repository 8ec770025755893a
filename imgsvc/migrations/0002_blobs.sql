-- Originals kept in the catalog database itself (IMGSVC_STORAGE_URL=postgres:), for small
-- deployments that want one backup. Keys are content addresses, so a row never changes.
CREATE TABLE blobs (
    key        text PRIMARY KEY,
    data       bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL;  -- images do not compress: skip TOAST compression
