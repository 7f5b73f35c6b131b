"""The optional limit on generations at once per client (--max-generations-per-client), shared by the API and the UI.

A client is its address (behind the ingress, the one uvicorn takes from X-Forwarded-For; see
inference_app.web.auth.client_address): in password mode every user has the same credentials, so the address is what
tells them apart. Without the limit, one client can hold every generation slot while everyone else waits or gets 429.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from inference_app.service import CapacityExceededError, GenerationChunk


class ClientLimitExceededError(CapacityExceededError):
    """The client already runs as many generations as the limit allows (the API answers 429, as for a full server)."""


class PerClientLimit:
    """Counts each client's running generations; with a limit, refuses one more. Used on the event loop only, so no
    lock; a client is forgotten when its last generation ends."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._running: dict[str, int] = {}

    async def limited(
        self, client: str, chunks: AsyncGenerator[GenerationChunk, None]
    ) -> AsyncGenerator[GenerationChunk, None]:
        """`chunks` (a ModelService.stream_chat generation), counted against `client` from the first iteration until
        the generation is closed; raises ClientLimitExceededError at the first iteration when the client is at its
        limit, as stream_chat raises its own request errors."""
        running = self._running.get(client, 0)
        if self.limit is not None and running >= self.limit:
            await chunks.aclose()
            raise ClientLimitExceededError(
                f"your address already has {running} replies running, this server's limit per client"
                " (--max-generations-per-client): wait for one to finish"
            )
        self._running[client] = running + 1
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
        finally:
            self._running[client] -= 1
            if not self._running[client]:
                del self._running[client]
