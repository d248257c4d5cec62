-- Every event ever written, indexed for per-aggregate reads, time ranges and
-- correlation ids. Kafka stays the source of truth: this is rebuilt from it.
CREATE TABLE event_log (
    event_id       text    NOT NULL UNIQUE,
    aggregate_type text    NOT NULL,
    aggregate_id   text    NOT NULL,
    stream_version bigint  NOT NULL,
    event_type     text    NOT NULL,
    record_name    text    NOT NULL,
    -- The schema version the event was written with, and the version its stored
    -- data is shaped as (the newest at indexing time); reads upcast from the latter.
    schema_version integer,
    data_version   integer NOT NULL,
    data           jsonb   NOT NULL,
    metadata       jsonb   NOT NULL,
    topic          text    NOT NULL,
    partition      integer NOT NULL,
    "offset"       bigint  NOT NULL,
    occurred_at    timestamptz NOT NULL,
    correlation_id text    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, stream_version)
);
CREATE INDEX event_log_aggregate ON event_log (aggregate_id);
CREATE INDEX event_log_occurred ON event_log (occurred_at);
CREATE INDEX event_log_correlation ON event_log (correlation_id, occurred_at);

-- Aggregate states folded up to a version, so a long stream loads fast. A snapshot
-- whose state_schema no longer matches the code's state shape is ignored.
CREATE TABLE snapshots (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    version        bigint NOT NULL,
    state_schema   text   NOT NULL,
    state          jsonb  NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, version)
);
