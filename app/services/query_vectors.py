"""Query texts -> vectors: the query cache first, then the text batcher.

Identical texts asked while one request is encoding them wait for that encode instead of
queueing their own (a burst of one popular query costs one forward pass). The request that
submitted a text stays its only submitter, so a client that goes away still has its item
skipped by the batcher; those waiting on it then submit the text themselves. Runs on the event
loop only: nothing else touches the in-flight map; cache lookups are dict reads under a lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from app.batching import Batcher
from app.query_cache import QueryCache


class QueryEncoder:
    def __init__(self, batcher: Batcher[str, np.ndarray], cache: QueryCache, model: str) -> None:
        self.batcher = batcher
        self.cache = cache
        self.model = model  # the identity every cache key carries
        self._inflight: dict[str, asyncio.Future[np.ndarray]] = {}

    async def encode(self, text: str, *, deadline_s: float | None = None) -> np.ndarray:
        return (await self.encode_many([text], deadline_s=deadline_s))[0]

    async def encode_many(
        self, texts: Sequence[str], *, deadline_s: float | None = None
    ) -> list[np.ndarray]:
        """One vector per text, in order; texts as the encoder gets them (already checked).
        `deadline_s`: the batcher's deadline for the texts this request encodes."""
        if not self.cache.enabled:
            return await self.batcher.submit_many(texts, deadline_s=deadline_s)
        unique = list(dict.fromkeys(texts))
        found: dict[str, np.ndarray] = {}
        for text in unique:
            vector = self.cache.get(self.model, text)
            if vector is not None:
                found[text] = vector
        mine = [t for t in unique if t not in found and t not in self._inflight]
        # taken before any await: every text another request is encoding is found here
        theirs = {t: self._inflight[t] for t in unique if t not in found and t not in mine}
        if mine:
            found.update(await self._encode(mine, deadline_s))
        for text, future in theirs.items():
            # asyncio.wait neither cancels `future` when this request is cancelled nor raises
            # when the other request was: its client went away and its item was skipped, so
            # this one asks again (becoming the encoder of the text, or finding it cached)
            await asyncio.wait({future})
            if future.cancelled():
                found[text] = (await self.encode_many([text], deadline_s=deadline_s))[0]
            else:
                found[text] = future.result()
        return [found[t] for t in texts]

    async def _encode(self, texts: list[str], deadline_s: float | None) -> dict[str, np.ndarray]:
        """One batcher call for `texts` (all or nothing, as submit_many is), made by this
        request: identical texts asked meanwhile wait on the futures registered here."""
        loop = asyncio.get_running_loop()
        futures = {text: loop.create_future() for text in texts}
        self._inflight.update(futures)
        try:
            vectors = await self.batcher.submit_many(texts, deadline_s=deadline_s)
        except BaseException as exc:
            for text, future in futures.items():
                del self._inflight[text]
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                    future.exception()  # marked as seen: nobody may be waiting on it
                else:
                    future.cancel()
            raise
        out = {}
        for (text, future), vector in zip(futures.items(), vectors, strict=True):
            del self._inflight[text]
            out[text] = self.cache.put(self.model, text, vector)
            future.set_result(out[text])
        return out
