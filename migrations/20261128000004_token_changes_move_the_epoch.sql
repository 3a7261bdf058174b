-- Revoking or deleting an API token moves the configuration epoch, like any change to what
-- authorization reads: an API node may then keep an authorization it read at an epoch for as long
-- as the epoch stays the same, and guard the write it authorizes with that epoch. Creating a
-- token changes no one's authorization, so it does not move the epoch.
CREATE TRIGGER bump_config_epoch AFTER UPDATE OR DELETE OR TRUNCATE ON api_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION picloud_bump_config_epoch();
