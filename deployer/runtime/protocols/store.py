"""The Responses API's store: responses kept in this container's memory, for ``previous_response_id``
and ``GET`` / ``DELETE /v1/responses/{id}``. Bounded (LRU, in count and in bytes), never persisted:
an id from another replica, or from before a restart, is a 404 that says so."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from deployer.runtime.protocol import ApiError


class ResponseStore:
    """Responses kept in this container's memory, for ``previous_response_id`` and GET/DELETE: LRU,
    bounded in count and in bytes (a response's JSON and its conversation)."""

    def __init__(self, max_items: int = 1000, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]], int]] = OrderedDict()
        self.bytes = 0

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        size = len(json.dumps(response)) + len(json.dumps(conversation))
        if size > self.max_bytes:
            return  # larger than the whole store: kept nowhere rather than emptying it
        self.delete(response["id"])
        self._items[response["id"]] = (response, conversation, size)
        self.bytes += size
        while len(self._items) > self.max_items or self.bytes > self.max_bytes:
            _, (_, _, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped

    def get(self, response_id: str, param: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if response_id not in self._items:
            raise ApiError(
                404,
                f"Response with id '{response_id}' not found: responses are kept in memory per container "
                "(not across restarts or replicas), and only the most recent ones",
                param=param,
                code="response_not_found",
            )
        self._items.move_to_end(response_id)
        response, conversation, _ = self._items[response_id]
        return response, conversation

    def delete(self, response_id: str) -> bool:
        entry = self._items.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry[2]
        return entry is not None
