-- A sync call whose row a relay finds with its lease run out is never delivered again: the node
-- that took it did not complete it (it died, or lost Postgres after the handler answered), and
-- running the handler a second time would run a call nobody waits for twice. The relay records it
-- as abandoned with a reason of its own.
ALTER TABLE abandoned_executions DROP CONSTRAINT abandoned_executions_reason_check;
ALTER TABLE abandoned_executions ADD CONSTRAINT abandoned_executions_reason_check
    CHECK (reason IN ('no_responders', 'ack_timeout', 'caller_gone', 'lease_expired'));
-- Such a call's outcome is not known: the node may have delivered it and answered its caller
-- (and then failed to complete the row), or died first.
ALTER TABLE abandoned_executions DROP CONSTRAINT abandoned_executions_handler_status_check;
ALTER TABLE abandoned_executions ADD CONSTRAINT abandoned_executions_handler_status_check
    CHECK (handler_status IN ('ok', 'retry', 'fail', 'error', 'timeout', 'no_handler', 'unknown'));

-- Changes to API tokens move the configuration epoch only when a row really changed: a statement
-- trigger moved it for a revoke that matched nothing (an already revoked token), dropping every
-- node's kept authorizations for no change at all.
DROP TRIGGER bump_config_epoch ON api_tokens;
CREATE TRIGGER bump_config_epoch_on_update AFTER UPDATE ON api_tokens
    FOR EACH ROW WHEN (OLD IS DISTINCT FROM NEW) EXECUTE FUNCTION picloud_bump_config_epoch();
CREATE TRIGGER bump_config_epoch_on_delete AFTER DELETE ON api_tokens
    FOR EACH ROW EXECUTE FUNCTION picloud_bump_config_epoch();
CREATE TRIGGER bump_config_epoch_on_truncate AFTER TRUNCATE ON api_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION picloud_bump_config_epoch();
