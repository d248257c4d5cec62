-- Where each projection has got to, stored in the same transaction as the rows it
-- wrote: the only way to an exactly-once effect in Postgres.
CREATE TABLE projection_positions (
    projection  text    NOT NULL,
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);
