"""How the core reports progress without knowing about terminals: the CLI passes a richer Reporter."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

log = logging.getLogger("stackwise")

Advance = Callable[..., None]  # advance(n=1, **fields): n units done; fields (loss=..., tok_s=...) to show


class Reporter:
    """Default reporter: silent progress, messages to the ``stackwise`` logger."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield lambda n=1, **fields: None

    def info(self, message: str) -> None:
        log.info(message)


QUIET = Reporter()
