-- Flow control (DESIGN §13): a trigger's `flow`, the ordering key of every delivery that has
-- one, and the lanes that hand ordered deliveries out one at a time.

-- The trigger's `flow` object as the API shows it; NULL is no flow.
ALTER TABLE triggers ADD COLUMN flow jsonb CHECK (flow IS NULL OR jsonb_typeof(flow) = 'object');

-- ordering_key: the event's ordering key (the envelope's `picloudorderingkey`).
-- lane: where the row waits its turn when its trigger orders deliveries (the key, or '' for the
-- whole trigger), fixed when the row is written; lane_seq its place in the lane, in write order
-- (writers of one lane are serialized by an advisory lock, so that order is commit order).
-- waiting: the row is not its lane's head. Only a head is claimed, so the claim itself never
-- looks at lanes; when a head leaves the outbox (delivered, dead-lettered, dropped) the
-- completing transaction makes the next row head.
ALTER TABLE outbox
    ADD COLUMN ordering_key text,
    ADD COLUMN lane text,
    ADD COLUMN lane_seq bigint,
    ADD COLUMN waiting boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT outbox_lane_has_a_place CHECK ((lane IS NULL) = (lane_seq IS NULL)),
    ADD CONSTRAINT outbox_only_lanes_wait CHECK (lane IS NOT NULL OR NOT waiting);
CREATE SEQUENCE outbox_lane_seq;
CREATE INDEX outbox_lanes ON outbox (trigger_id, lane, lane_seq) WHERE lane IS NOT NULL;
-- The claim walks only rows that may be claimed: waiting rows are never in its index.
DROP INDEX outbox_due;
CREATE INDEX outbox_due ON outbox (due_at) WHERE NOT waiting;

-- A dead letter of an ordered delivery whose trigger holds its key on dead letters: the lane it
-- keeps blocked until it is resolved.
ALTER TABLE dead_letters ADD COLUMN held_lane text;
CREATE INDEX dead_letters_holding ON dead_letters (trigger_id, held_lane) WHERE held_lane IS NOT NULL;

-- Lanes whose head left (or whose dead letter was resolved) while a writer held the lane's lock:
-- a completion never waits for a writer, so it notes the lane here, and the next row becomes
-- head when a later release finds the lock free.
CREATE TABLE lane_releases (
    trigger_id  uuid NOT NULL,
    lane        text NOT NULL,
    PRIMARY KEY (trigger_id, lane)
);
