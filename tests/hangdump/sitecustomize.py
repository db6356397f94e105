"""Loaded by CLI processes the tests start: SIGUSR1 writes every thread's stack and every
asyncio task's chain of awaits to stderr, so a test can say where a command that hangs
waits."""

import asyncio
import signal
import sys
import traceback
from typing import Any


def _awaits(coro: Any) -> list[str]:
    """The chain of awaits below a task's coroutine, outermost first."""
    lines = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in "
                         f"{frame.f_code.co_name}")
        else:
            lines.append(f"  {coro!r}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return lines


def _dump(signum: int, frame: object) -> None:
    out = sys.stderr
    for ident, stack in sys._current_frames().items():
        out.write(f"\n--- thread {ident}\n")
        traceback.print_stack(stack, file=out)
    loop = asyncio._get_running_loop()  # the signal runs in the main thread, in the loop
    if loop is not None:
        for task in asyncio.all_tasks(loop):
            out.write(f"\n=== {task.get_name()}\n" + "\n".join(_awaits(task.get_coro())) + "\n")
    out.flush()


signal.signal(signal.SIGUSR1, _dump)
