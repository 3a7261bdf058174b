-- Fairness between apps (DESIGN §13): the plain claim walks the apps that have rows, in turn, and
-- takes each one's oldest due rows, so that one app's backlog is never scanned to reach another
-- app's rows. The index by due time alone goes: with it beside this one, the planner could take
-- it for one app's rows and filter every other app's rows out on the way.
DROP INDEX outbox_due;
CREATE INDEX outbox_app_due ON outbox (app_id, due_at) WHERE NOT waiting AND NOT gated;
