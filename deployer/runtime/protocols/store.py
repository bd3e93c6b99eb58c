"""The Responses API's store: responses kept in this container's memory, for ``previous_response_id``
and ``GET`` / ``DELETE /v1/responses/{id}``. Bounded (LRU, in count and in bytes), never persisted:
an id from another replica, or from before a restart, is a 404 that says so.

A conversation with images (or audio clips) keeps them beside its turns, with the marker that stands for them in
the turns' text (``deployer.runtime.media.images``): a follow-up turn carries them into its own prompt."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from deployer.runtime.errors import ApiError
from deployer.runtime.media.images import Media as Item

Media = tuple[str, tuple[Item, ...]]  # the marker in the stored turns' text, and the images and clips it stands for
NO_MEDIA: Media = ("", ())


class ResponseStore:
    """Responses kept in this container's memory, for ``previous_response_id`` and GET/DELETE: LRU,
    bounded in count and in bytes (a response's JSON and its conversation)."""

    def __init__(self, max_items: int = 1000, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]], int]] = OrderedDict()
        self._media: dict[str, Media] = {}
        self.bytes = 0

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]], media: Media = NO_MEDIA) -> None:
        size = len(json.dumps(response)) + len(json.dumps(conversation)) + sum(len(i.data) for i in media[1])
        if size > self.max_bytes:
            return  # larger than the whole store: kept nowhere rather than emptying it
        self.delete(response["id"])
        self._items[response["id"]] = (response, conversation, size)
        if media[1]:
            self._media[response["id"]] = media
        self.bytes += size
        while len(self._items) > self.max_items or self.bytes > self.max_bytes:
            dropped_id, (_, _, dropped) = self._items.popitem(last=False)
            self._media.pop(dropped_id, None)
            self.bytes -= dropped

    def media(self, response_id: Any) -> Media:
        """The images and clips of a stored conversation and their marker (none for an id not stored: get() says so)."""
        return self._media.get(response_id, NO_MEDIA) if isinstance(response_id, str) else NO_MEDIA

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
        self._media.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry[2]
        return entry is not None
