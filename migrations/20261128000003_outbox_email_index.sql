-- /readyz asks on every probe whether email rows wait (DESIGN §10). Without an index that is a
-- scan of the whole outbox; this partial index holds email rows only, so other writes never
-- touch it.
CREATE INDEX outbox_email ON outbox (due_at) WHERE kind = 'email';
