-- Flow limits (DESIGN §13): `concurrency` and `rate`, exact across relays.

-- gated: the row's trigger limits its deliveries. The plain claim never takes a gated row (they
-- are not in its index); a relay takes them in a claim of their own that holds the trigger's
-- flow_state row, so that relays count and spend one trigger's slots and tokens one at a time.
ALTER TABLE outbox ADD COLUMN gated boolean NOT NULL DEFAULT false;
DROP INDEX outbox_due;
CREATE INDEX outbox_due ON outbox (due_at) WHERE NOT waiting AND NOT gated;
CREATE INDEX outbox_gated ON outbox (trigger_id, due_at) WHERE gated AND NOT waiting;

-- One row per limited trigger, written with its flow: the row relays lock to claim its rows
-- (the claim is one statement: its FOR UPDATE reads the newest version, whatever relay committed
-- last), its rate's token bucket (tokens as of refilled_at; NULL without a rate), and the
-- concurrency slots each running relay holds: {"<holder>": [held, until (unix seconds)]}, as many
-- as it has deliveries of the trigger in flight, counted when it last claimed. A relay that dies
-- holds them until `until` (its claim's lease); then they count for nothing, and the next claim
-- drops them.
CREATE TABLE flow_state (
    trigger_id  uuid PRIMARY KEY REFERENCES triggers (id) ON DELETE CASCADE,
    tokens      float8,
    refilled_at timestamptz NOT NULL,
    slots       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(slots) = 'object')
);
