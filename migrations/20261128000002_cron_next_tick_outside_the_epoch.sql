-- picloud-router: the cron scheduler moves `cron_trigger_details.next_tick_at` on every tick it
-- fires. That column is the scheduler's bookkeeping, not configuration that a delivery decision
-- reads, so moving it must not bump the configuration epoch: every relay would read its triggers
-- again after every tick. Changes to the other columns still bump it.
DROP TRIGGER bump_config_epoch ON cron_trigger_details;
CREATE TRIGGER bump_config_epoch
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF trigger_id, app_id, kind, schedule, timezone
    ON cron_trigger_details
    FOR EACH STATEMENT EXECUTE FUNCTION picloud_bump_config_epoch();
