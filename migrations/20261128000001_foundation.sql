-- picloud-router: the foundation schema (apps and auth, KV, triggers, outbox, dead letters,
-- abandoned executions). Read DESIGN §3, §4, §7-§9 and ARCHITECTURE.md "Data" with it.
--
-- Foreign keys are chosen per table:
--   * everything an app owns cascades from `apps`, so deleting an app removes all of it;
--   * dead letters and abandoned executions keep their trigger's name and lose only the link
--     (ON DELETE SET NULL) when the trigger is deleted: the history outlives the trigger;
--   * `outbox` and `kv_entries` have no foreign keys. They take the hot writes: a foreign key
--     check takes a KEY SHARE lock on the app or trigger row for every insert, which becomes a
--     multixact and a WAL record when writers run concurrently (measured: a third of a
--     single-event write's execution time). Deleting an app deletes their rows explicitly, and a
--     delivery whose app or trigger is gone is dropped by the relay when it is claimed.

CREATE TABLE apps (
    id          uuid PRIMARY KEY,
    slug        text COLLATE "C" NOT NULL UNIQUE CHECK (slug ~ '^[a-z][a-z0-9-]{0,62}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE principals (
    id              uuid PRIMARY KEY,
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    platform_admin  boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE app_members (
    app_id        uuid NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    principal_id  uuid NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    role          text NOT NULL CHECK (role IN ('viewer', 'developer', 'admin')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, principal_id)
);
CREATE INDEX app_members_by_principal ON app_members (principal_id);

CREATE TABLE api_tokens (
    id            uuid PRIMARY KEY,
    principal_id  uuid NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    -- SHA-256 of the token text; the token itself is never stored.
    token_hash    bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    app_id        uuid REFERENCES apps (id) ON DELETE CASCADE,
    scopes        text[] CHECK (scopes <@ ARRAY['platform_admin', 'app_admin', 'app_write',
                                               'app_publish', 'app_send', 'app_invoke', 'app_read']),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_tokens_by_principal ON api_tokens (principal_id);

CREATE TABLE kv_entries (
    app_id      uuid NOT NULL,
    collection  text COLLATE "C" NOT NULL,
    key         text COLLATE "C" NOT NULL,
    value       jsonb NOT NULL,
    version     bigint NOT NULL CHECK (version > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, collection, key)
);

CREATE TABLE triggers (
    id                       uuid PRIMARY KEY,
    app_id                   uuid NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    name                     text COLLATE "C" NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    kind                     text NOT NULL
                             CHECK (kind IN ('kv', 'pubsub', 'queue', 'cron', 'dead_letter', 'http')),
    -- The handler: a function served over NATS, or a webhook (URL and its whsec_ secret).
    handler_function         text CHECK (handler_function ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    webhook_url              text,
    webhook_secret           text,
    -- Per-trigger overrides of the retry policy; NULL means the configured default.
    retry_max_attempts       integer CHECK (retry_max_attempts BETWEEN 1 AND 1000),
    retry_backoff_base_ms    bigint CHECK (retry_backoff_base_ms >= 1),
    retry_backoff_max_ms     bigint CHECK (retry_backoff_max_ms >= 1),
    enabled                  boolean NOT NULL DEFAULT true,
    -- The trigger runs as this principal; a principal who still runs triggers cannot be deleted.
    registered_by_principal  uuid NOT NULL REFERENCES principals (id),
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    UNIQUE (app_id, name),
    -- Referenced by the detail tables, so a detail row can only belong to a trigger of its kind.
    UNIQUE (id, app_id, kind),
    CHECK (num_nonnulls(handler_function, webhook_url) = 1),
    CHECK ((webhook_url IS NULL) = (webhook_secret IS NULL))
);
CREATE INDEX triggers_by_registering_principal ON triggers (registered_by_principal);

-- One detail table per trigger kind with kind-specific fields (`http` has none). Each row
-- carries its trigger's app and kind, pinned by the composite foreign key.

CREATE TABLE kv_trigger_details (
    trigger_id     uuid PRIMARY KEY,
    app_id         uuid NOT NULL,
    kind           text NOT NULL DEFAULT 'kv' CHECK (kind = 'kv'),
    -- The collection pattern: `stem*` when is_prefix, else the exact name `stem`.
    collection_stem       text COLLATE "C" NOT NULL,
    collection_is_prefix  boolean NOT NULL,
    ops            text[] NOT NULL CHECK (cardinality(ops) > 0 AND ops <@ ARRAY['put', 'delete']),
    FOREIGN KEY (trigger_id, app_id, kind) REFERENCES triggers (id, app_id, kind) ON DELETE CASCADE
);
CREATE INDEX kv_trigger_details_by_app ON kv_trigger_details (app_id);

CREATE TABLE pubsub_trigger_details (
    trigger_id       uuid PRIMARY KEY,
    app_id           uuid NOT NULL,
    kind             text NOT NULL DEFAULT 'pubsub' CHECK (kind = 'pubsub'),
    topic_stem       text COLLATE "C" NOT NULL,
    topic_is_prefix  boolean NOT NULL,
    FOREIGN KEY (trigger_id, app_id, kind) REFERENCES triggers (id, app_id, kind) ON DELETE CASCADE
);
CREATE INDEX pubsub_trigger_details_by_app ON pubsub_trigger_details (app_id);

CREATE TABLE queue_trigger_details (
    trigger_id  uuid PRIMARY KEY,
    app_id      uuid NOT NULL,
    kind        text NOT NULL DEFAULT 'queue' CHECK (kind = 'queue'),
    queue       text COLLATE "C" NOT NULL,
    -- A queue has at most one trigger.
    UNIQUE (app_id, queue),
    FOREIGN KEY (trigger_id, app_id, kind) REFERENCES triggers (id, app_id, kind) ON DELETE CASCADE
);

CREATE TABLE cron_trigger_details (
    trigger_id    uuid PRIMARY KEY,
    app_id        uuid NOT NULL,
    kind          text NOT NULL DEFAULT 'cron' CHECK (kind = 'cron'),
    schedule      text NOT NULL,
    timezone      text NOT NULL DEFAULT 'UTC',
    -- The next tick to fire; advanced in the same transaction that writes the tick's delivery,
    -- so exactly one node fires each tick.
    next_tick_at  timestamptz,
    FOREIGN KEY (trigger_id, app_id, kind) REFERENCES triggers (id, app_id, kind) ON DELETE CASCADE
);
CREATE INDEX cron_trigger_details_next_tick ON cron_trigger_details (next_tick_at);

CREATE TABLE dead_letter_trigger_details (
    trigger_id      uuid PRIMARY KEY,
    app_id          uuid NOT NULL,
    kind            text NOT NULL DEFAULT 'dead_letter' CHECK (kind = 'dead_letter'),
    -- Only dead letters of this trigger (by name), when set.
    source_trigger  text,
    -- Only dead letters of these event kinds, when set.
    source_kinds    text[] CHECK (source_kinds <@ ARRAY['kv', 'pubsub', 'queue', 'cron', 'dead_letter',
                                                       'http', 'email']),
    FOREIGN KEY (trigger_id, app_id, kind) REFERENCES triggers (id, app_id, kind) ON DELETE CASCADE
);
CREATE INDEX dead_letter_trigger_details_by_app ON dead_letter_trigger_details (app_id);

CREATE TABLE dead_letters (
    id            uuid PRIMARY KEY,
    app_id        uuid NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    trigger_id    uuid REFERENCES triggers (id) ON DELETE SET NULL,
    trigger_name  text,
    kind          text NOT NULL
                  CHECK (kind IN ('kv', 'pubsub', 'queue', 'cron', 'dead_letter', 'http', 'email')),
    -- The outbox row (delivery id) that died.
    delivery_id   uuid NOT NULL,
    -- The event's data, and its CloudEvents context (type, source, subject, time, depth).
    payload       json NOT NULL,
    headers       jsonb NOT NULL,
    attempts      integer NOT NULL,
    reason        text NOT NULL CHECK (reason IN ('exhausted', 'rejected', 'max_depth', 'unauthorized')),
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    resolution    text CHECK (resolution IN ('replayed', 'ignored', 'handled_by_script', 'handler_failed')),
    resolved_at   timestamptz,
    CHECK ((resolution IS NULL) = (resolved_at IS NULL))
);
-- The dashboard badge and the unresolved list.
CREATE INDEX dead_letters_unresolved ON dead_letters (app_id, id DESC) WHERE resolution IS NULL;
CREATE INDEX dead_letters_by_app ON dead_letters (app_id, id DESC);
CREATE INDEX dead_letters_resolved_at ON dead_letters (resolved_at) WHERE resolution IS NOT NULL;
CREATE INDEX dead_letters_by_trigger ON dead_letters (trigger_id) WHERE trigger_id IS NOT NULL;

CREATE TABLE outbox (
    id               uuid PRIMARY KEY,
    app_id           uuid NOT NULL,
    -- NULL only for emails, which go to the built-in executor without a trigger.
    trigger_id       uuid,
    kind             text NOT NULL
                     CHECK (kind IN ('kv', 'pubsub', 'queue', 'cron', 'dead_letter', 'http', 'email')),
    -- The CloudEvents context of the event, fixed when the event is written.
    event_type       text NOT NULL,
    source           text NOT NULL,
    subject          text,
    payload          json NOT NULL,
    depth            integer NOT NULL DEFAULT 0 CHECK (depth >= 0),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    due_at           timestamptz NOT NULL DEFAULT now(),
    -- The lease of the relay that claimed the row. Not indexed, on purpose: with fillfactor 50 the
    -- claim's update stays a HOT update (no new index entries), which the drain rate depends on.
    leased_until     timestamptz,
    leased_by        text,
    -- A sync invocation's inbox; such a row is never retried nor dead-lettered.
    reply_to         text,
    idempotency_key  text,
    -- Set on deliveries of dead_letter triggers: the dead letter they report.
    dead_letter_id   uuid,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (kind = 'email' OR trigger_id IS NOT NULL),
    CHECK ((kind = 'dead_letter') = (dead_letter_id IS NOT NULL))
) WITH (fillfactor = 50);
-- The claim: ORDER BY due_at LIMIT n FOR UPDATE SKIP LOCKED.
CREATE INDEX outbox_due ON outbox (due_at);
CREATE UNIQUE INDEX outbox_idempotency ON outbox (trigger_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX outbox_by_dead_letter ON outbox (dead_letter_id) WHERE dead_letter_id IS NOT NULL;

-- The configuration epoch: bumped by every change to what deciding a delivery reads (apps,
-- principals, memberships, triggers and their details). A claim reports it, so a relay may keep
-- what it read about triggers and principals for as long as the epoch stays the same: exactly as
-- fresh as reading it again, without the round trip.
CREATE TABLE config_epoch (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch      bigint NOT NULL
);
INSERT INTO config_epoch (singleton, epoch) VALUES (true, 0);

CREATE FUNCTION picloud_bump_config_epoch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE config_epoch SET epoch = epoch + 1;
    RETURN NULL;
END
$$;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['apps', 'principals', 'app_members', 'triggers', 'kv_trigger_details',
                             'pubsub_trigger_details', 'queue_trigger_details', 'cron_trigger_details',
                             'dead_letter_trigger_details'] LOOP
        EXECUTE format('CREATE TRIGGER bump_config_epoch AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %I
                        FOR EACH STATEMENT EXECUTE FUNCTION picloud_bump_config_epoch()', t);
    END LOOP;
END
$$;

-- A time-ordered UUID (version 7) for rows written by SQL alone, like the ids the code makes.
CREATE FUNCTION picloud_uuid_v7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

-- Raised by a statement that finds it raced a concurrent writer; the caller tries again.
CREATE FUNCTION picloud_raced(what text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% changed concurrently; try again', what USING ERRCODE = '40001';
END
$$;

CREATE TABLE abandoned_executions (
    id              uuid PRIMARY KEY,
    app_id          uuid NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    trigger_id      uuid REFERENCES triggers (id) ON DELETE SET NULL,
    trigger_name    text NOT NULL,
    outbox_id       uuid NOT NULL,
    reply_to        text NOT NULL,
    reason          text NOT NULL CHECK (reason IN ('no_responders', 'ack_timeout', 'caller_gone')),
    -- What the handler answered: ok, retry, fail, error (no usable answer), timeout, no_handler.
    handler_status  text NOT NULL
                    CHECK (handler_status IN ('ok', 'retry', 'fail', 'error', 'timeout', 'no_handler')),
    result          json,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX abandoned_executions_by_app ON abandoned_executions (app_id, id DESC);
CREATE INDEX abandoned_executions_created_at ON abandoned_executions (created_at);
CREATE INDEX abandoned_executions_by_trigger ON abandoned_executions (trigger_id) WHERE trigger_id IS NOT NULL;
