"""The ledger's group commit on a database over the network: commits run in a thread."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Run in a process of its own: the bug this guards against froze the event loop in a busy
# loop, holding the GIL, which no timeout inside the process could end.
SCENARIO = textwrap.dedent("""
    import asyncio, threading, time
    from newsletter.delivery.engine import _Ledger
    from newsletter.store.base import Mark
    from newsletter.store.schema import DeliveryStatus

    class Store:
        def __init__(self):
            self.commits, self.done = [], threading.Event()
        def begin(self, marks, **kw):
            self.commits.append([m.delivery_id for m in marks])
            self.done.set()
            return set()

    async def main():
        store = Store()
        ledger = _Ledger(store, [], 1, threaded=True)
        ledger.finish(Mark(7, DeliveryStatus.SENT))
        await asyncio.sleep(0)  # the commit starts in a thread
        store.done.wait(10)
        time.sleep(0.2)  # it ends; its completion is queued for the loop's next turn
        # drain's first step runs in that same turn, before the completion's own callback.
        await asyncio.wait_for(asyncio.ensure_future(ledger.drain()), 10)
        ledger.finish(Mark(8, DeliveryStatus.SENT))
        await asyncio.wait_for(ledger.drain(), 10)
        print(store.commits)

    asyncio.run(main())
""")


def test_draining_as_a_threaded_commit_ends_waits_for_it_instead_of_spinning() -> None:
    try:
        done = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("drain never returned: the event loop spun") from None
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[[7], [8]]"
