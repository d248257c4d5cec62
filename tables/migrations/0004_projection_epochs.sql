-- Bumped whenever a projection's tables are replaced or emptied under its running
-- consumers: a blue/green replay's switch, an in-place replay, a rewound group. A
-- runner that finds a newer epoch in its batch transaction rolls back, re-reads its
-- positions and seeks there (see app/projections/replay.py). No row means epoch 0.
CREATE TABLE projection_epochs (
    projection text   PRIMARY KEY,
    epoch      bigint NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
