-- A cancelled delivery (DESIGN §14) becomes a dead letter with reason `cancelled`, resolved
-- `ignored` at once.
ALTER TABLE dead_letters
    DROP CONSTRAINT dead_letters_reason_check,
    ADD CONSTRAINT dead_letters_reason_check
        CHECK (reason IN ('exhausted', 'rejected', 'max_depth', 'unauthorized', 'cancelled'));
