-- Batches (DESIGN §14): a trigger's `batch` object as the API shows it (`max_size`,
-- `max_wait_ms`); NULL is not batched. It lives on the trigger row, so changing it moves the
-- configuration epoch like any other change to a trigger, and a relay reads it with the rest.
ALTER TABLE triggers ADD COLUMN batch jsonb CHECK (batch IS NULL OR jsonb_typeof(batch) = 'object');
