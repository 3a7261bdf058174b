"""The README tour's handler in Python, with the stock nats-py client (pip install nats-py).

Serves `on-note` for the app of `picloud-router dev`; a note whose text is "fail" is refused,
so it becomes a dead letter. Run it with the values `dev` wrote:

    set -a; . .picloud/dev.env; set +a
    python3 examples/notes.py
"""

import asyncio
import json
import os

import nats


async def main():
    app = os.environ["PICLOUD_APP"]
    nc = await nats.connect(
        os.environ["PICLOUD_NATS_URL"],
        user=os.environ["PICLOUD_NATS_APP_USER"],
        password=os.environ["PICLOUD_NATS_APP_PASSWORD"],
        inbox_prefix=f"_INBOX_{app}".encode(),
    )

    async def on_note(msg):
        event = json.loads(msg.data)  # the CloudEvents envelope
        note = event["data"]["value"]
        print(event["id"], "attempt", event["picloudattempt"], note, flush=True)
        # Answer on the request's reply subject; the Picloud-Status header says how it went.
        if note.get("text") == "fail":
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
