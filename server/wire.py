"""Message building blocks and byte accounting from the real records.

Bytes are counted with the records' own `count_bytes()` (array payloads incl. the small
numpy header, keys, 8 B per metric/config scalar), summed over every record of a message's
content: what the server sent down and what a client sent back up.
"""
from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from logging import INFO


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's content (all records)."""
    return int(sum(rec.count_bytes() for rec in content.values()))


def message_bytes(msg: Message) -> int:
    return 0 if msg.has_error() else content_bytes(msg.content)


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float = 600.0) -> list[int]:
    """Connected node ids once at least `min_nodes` are there (the grid starts empty)."""
    start, last = time.time(), -1
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if len(nodes) != last:
            log(INFO, "Waiting for nodes: %d connected, %d required", len(nodes), min_nodes)
            last = len(nodes)
        if time.time() - start > timeout:
            raise TimeoutError(f"only {len(nodes)} of min-nodes={min_nodes} nodes connected after {timeout:.0f} s")
        time.sleep(0.5)
    return nodes


def by_source(replies: Iterable[Message]) -> dict[int, Message]:
    return {int(r.metadata.src_node_id): r for r in replies}
