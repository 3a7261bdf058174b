-- Raised by a write whose event data, built in SQL, is larger than an event may be (DESIGN §10:
-- it must fit the NATS server's max_payload inside its envelope). The whole statement, and the
-- data change that caused the event, is rolled back; the API answers 413.
CREATE FUNCTION picloud_too_large(bytes integer, max_bytes bigint) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event would carry % bytes of data; at most % fit', bytes, max_bytes
        USING ERRCODE = '54000';
END
$$;
