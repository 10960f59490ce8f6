"""Keepalives for Server-Sent Event streams.

A stream that has nothing to say for a while (a run queued behind others, a trainer loading a model, a model
server busy with another request) sends no byte, and a client's read timeout (the runrl SDK's httpx client:
30 s, then it retries from the start) or a proxy's idle timeout ends it. Both streams the API serves, a run's
logs (`server/routes/run_outputs.py`) and a deployment's streamed chat completions (the proxy in
`server/routes/deployments.py`), therefore send `KEEPALIVE` after `Settings.sse_keepalive_s` (15 s) without an
event: one empty line, sent only where an event has ended. To an SSE parser an empty line with no field before it
dispatches nothing (EventSource, the dashboard, `runrl runs logs --follow`, the openai client all skip it), and
the runrl SDK's `runs.stream_logs`, which yields every non-empty line of the body as it is (`data: ...`, `event:
end`), yields nothing for it. A comment line (`: keepalive`), the HTML standard's suggestion, would reach SDK users
as a log line every 15 s.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

KEEPALIVE = "\n"
_END = object()
_EVENT_ENDS = (b"\n\n", b"\r\r", b"\r\n\r\n")


async def with_keepalives(source: AsyncIterator[bytes], interval_s: float) -> AsyncIterator[bytes]:
    """`source`'s bytes unchanged, plus `KEEPALIVE` after every `interval_s` without a byte from it, only where an
    event has ended (or before the first), never inside one, so the events a client parses are the same.

    `source` is read by its own task, so waiting for it can time out without cancelling a read halfway; an
    error from it ends this stream with the same error."""
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=64)

    async def pump() -> None:
        try:
            async for chunk in source:
                await queue.put(chunk)
            await queue.put(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the upstream connection broke: the consumer re-raises it
            await queue.put(exc)

    task = asyncio.ensure_future(pump())
    tail, between_events = b"", True
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), interval_s)
            except asyncio.TimeoutError:
                if between_events:
                    yield KEEPALIVE.encode()
                continue
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            assert isinstance(item, bytes)
            if item:
                tail = (tail + item)[-4:]
                between_events = tail.endswith(_EVENT_ENDS)
                yield item
    finally:
        task.cancel()
