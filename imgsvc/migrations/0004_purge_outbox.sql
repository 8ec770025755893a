-- The CDN purge outbox: a delete writes its job here in the delete's own transaction; one sender delivers it.
CREATE TABLE purge_targets (
    name          text PRIMARY KEY,  -- kind:address, e.g. webhook:https://hooks.example/purge
    registered_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE purge_jobs (
    id         bigserial PRIMARY KEY,  -- delivery order per target
    image_id   text        NOT NULL,
    reason     text        NOT NULL CHECK (reason IN ('delete', 'resend')),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- One row per job and target registered when the job was written: the attempts and their outcome.
CREATE TABLE purge_deliveries (
    job_id          bigint      NOT NULL REFERENCES purge_jobs (id) ON DELETE CASCADE,
    target          text        NOT NULL REFERENCES purge_targets (name) ON DELETE CASCADE,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_at    timestamptz,
    PRIMARY KEY (job_id, target)
);
-- The head of each target's queue.
CREATE INDEX purge_deliveries_pending ON purge_deliveries (target, job_id) WHERE delivered_at IS NULL;
CREATE INDEX purge_deliveries_target ON purge_deliveries (target);
CREATE INDEX purge_jobs_created ON purge_jobs (created_at);
