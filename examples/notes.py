"""The README tour's handler in Python, with the stock nats-py client (pip install nats-py).

Serves `on-note` for the app of `picloud-router dev`; a note whose text is "fail" is refused,
so it becomes a dead letter, and one whose text is "slow" takes its `seconds`, longer than the
handler timeout, saying that it is still working. It answers the batches of a trigger with
`batch` too. Run it with the values `dev` wrote:

    set -a; . .picloud/dev.env; set +a
    python3 examples/notes.py
"""

import asyncio
import json
import os
import sys
import time

import nats

# How long the first connection may take before the example gives up and says why.
CONNECT_WITHIN_S = 5


async def main():
    app = os.environ["PICLOUD_APP"]
    url = os.environ["PICLOUD_NATS_URL"]
    connected = False
    last_error = None

    async def on_error(e):
        nonlocal last_error
        last_error = e
        if connected:  # once serving, the client reconnects by itself; say what happened
            print(f"NATS at {url}: {e!r}", file=sys.stderr, flush=True)

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                url,
                user=os.environ["PICLOUD_NATS_APP_USER"],
                password=os.environ["PICLOUD_NATS_APP_PASSWORD"],
                inbox_prefix=f"_INBOX_{app}".encode(),
                error_cb=on_error,
            ),
            CONNECT_WITHIN_S,
        )
    except (asyncio.TimeoutError, OSError, nats.errors.Error) as e:
        sys.exit(
            f"connecting to NATS at {url} (PICLOUD_NATS_URL) failed: {last_error or e!r}; "
            "is `picloud-router dev` running, and is .picloud/dev.env loaded from this run?"
        )
    connected = True

    async def work_long(msg, event, seconds):
        # Until the answer, `working` on the reply subject moves the deadline to the handler
        # timeout from then: say it every third of the time the first deadline left.
        every = max(0.1, (event["piclouddeadline"] / 1000 - time.time()) / 3)
        started = time.monotonic()
        while (done := time.monotonic() - started) < seconds:
            progress = str(int(100 * done / seconds))
            await nc.publish(msg.reply, b"", headers={"Picloud-Status": "working", "Picloud-Progress": progress})
            await asyncio.sleep(min(every, seconds - done))
        print(event["id"], f"done after {seconds} s", flush=True)
        await nc.publish(msg.reply, b"{}", headers={"Picloud-Status": "ok"})

    working = set()  # the long tasks, held until they end (asyncio keeps only weak references)

    async def on_batch(msg):
        # A trigger with `batch` sends many envelopes in one request: one answer, whose header
        # speaks for every delivery but those its `results` name.
        results = {}
        for event in json.loads(msg.data):
            note = event["data"]["value"]
            print(event["id"], "attempt", event["picloudattempt"], "in a batch:", note, flush=True)
            if note.get("text") == "fail":
                results[event["id"]] = "fail"
        await nc.publish(msg.reply, json.dumps({"results": results}).encode(), headers={"Picloud-Status": "ok"})

    async def on_note(msg):
        if (msg.headers or {}).get("Content-Type") == "application/cloudevents-batch+json":
            await on_batch(msg)
            return
        event = json.loads(msg.data)  # the CloudEvents envelope
        note = event["data"]["value"]
        print(event["id"], "attempt", event["picloudattempt"], note, flush=True)
        # Answer on the request's reply subject; the Picloud-Status header says how it went.
        if note.get("text") == "slow":
            # In a task of its own: this callback takes the subscription's next message only
            # once it returns.
            task = asyncio.create_task(work_long(msg, event, int(note.get("seconds", 40))))
            working.add(task)
            task.add_done_callback(working.discard)
        elif note.get("text") == "fail":
            headers = {"Picloud-Status": "fail", "Picloud-Error": "this note asked to fail"}
            await nc.publish(msg.reply, b"", headers=headers)
        else:
            await nc.publish(msg.reply, json.dumps({"seen": note}).encode(), headers={"Picloud-Status": "ok"})

    # One queue group per handler: each delivery goes to one instance, wherever it runs.
    await nc.subscribe(f"picloud.v1.handle.{app}.on-note", queue=f"picloud.{app}.on-note", cb=on_note)
    await nc.flush()
    print("serving on-note; Ctrl-C stops", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
