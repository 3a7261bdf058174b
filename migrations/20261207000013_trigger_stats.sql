-- Statistics of each trigger's attempts (DESIGN §15): one row per trigger, minute and relay
-- node, to which each completion batch adds what it counted (an upsert per trigger and batch).
-- Rows of one node are written by that node alone (its relay's reports, and its own sync
-- calls'), so nodes never wait on each other's statistics. `latency` holds the counts of the fixed histogram of `picloud_core::stats`
-- (buckets merge by adding them). No foreign key: a check per upsert would lock the trigger row;
-- a deleted trigger's rows are read by nobody and pruned with the rest after a week.
CREATE TABLE trigger_stats (
    trigger_id uuid NOT NULL,
    bucket timestamptz NOT NULL,
    node text NOT NULL,
    ok bigint NOT NULL,
    retry bigint NOT NULL,
    fail bigint NOT NULL,
    timeout bigint NOT NULL,
    no_handler bigint NOT NULL,
    latency bigint[] NOT NULL,
    PRIMARY KEY (trigger_id, bucket, node)
);
CREATE INDEX trigger_stats_bucket ON trigger_stats (bucket);
