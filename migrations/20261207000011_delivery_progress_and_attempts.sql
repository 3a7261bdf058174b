-- What the deliveries API shows of a delivery in the outbox (DESIGN §15): the progress its
-- handler last reported while working (DESIGN §14), reset by each claim, and its earlier
-- attempts (the last 20, oldest first: start, end, outcome, error, node), appended when an
-- attempt is rescheduled. Both live on the row, so they go with it, and an attempt that succeeds
-- the first time writes neither. Neither is indexed: updating them keeps the update HOT.
ALTER TABLE outbox
    ADD COLUMN progress smallint,
    ADD COLUMN attempt_log jsonb;
