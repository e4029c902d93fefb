"""Message helpers of the ServerApp: records from arrays, byte accounting, waiting for nodes.

Bytes are counted with the records' own `count_bytes()` (array payloads incl. the small
numpy header, keys, 8 B per metric/config scalar), summed over every record of a message's
content: what the server sent down and what a client sent back up.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from logging import INFO


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_bytes(rec) -> int:
    """`count_bytes()` of a record; flwr 1.42's ConfigRecord.count_bytes() raises on an empty string or an
    empty list (a client can send one; SecAgg+'s stage messages carry both), so such a record is counted
    here: key + payload (8 B per number, the length of a string or bytes, element by element in a list)."""
    try:
        return int(rec.count_bytes())
    except (ValueError, IndexError):
        return sum(len(k) + sum(len(x) if isinstance(x, (str, bytes)) else 8 for x in (v if isinstance(v, list)
                                                                                        else [v]))
                   for k, v in rec.items())


def stamp(msg: Message) -> Message:
    """Give a message its id as a grid does when it pushes it; replies name it in `reply_to_message_id`,
    which is how the server matches them. Flower's own grids (InMemoryGrid, HttpGrid) set it this way."""
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's content (all records)."""
    return int(sum(record_bytes(rec) for rec in content.values()))


def message_bytes(msg: Message) -> int:
    return 0 if msg.has_error() else content_bytes(msg.content)


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float | None = None, log_every: float = 30.0,
                   what: str = "min-nodes") -> list[int]:
    """Connected node ids once at least `min_nodes` are there (the grid starts empty).

    While waiting it logs how many nodes it has and needs, at once and then every `log_every`
    seconds. `timeout=None` waits as long as it takes (the run can be stopped with `flwr stop`);
    otherwise TimeoutError after `timeout` seconds. `what` names the setting in the messages.
    """
    start = time.monotonic()
    next_log = start
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        now = time.monotonic()
        if timeout is not None and now - start >= timeout:
            raise TimeoutError(f"{len(nodes)} node(s) connected, {what}={min_nodes} needed, after waiting "
                               f"{timeout:.0f} s")
        if now >= next_log:
            log(INFO, "Waiting for nodes: %d connected, %d needed (%s); waited %.0f s", len(nodes), min_nodes,
                what, now - start)
            next_log = now + log_every
        time.sleep(0.5)
    return nodes


def match_replies(sent: list[Message], replies: Iterable[Message],
                  drop: Callable[[int, str], None]) -> dict[int, Message]:
    """Replies by the node they answer, matched on `reply_to_message_id` (not on the source id:
    the SuperLink answers for a lost node with an error reply from its own id). At most one reply
    per node; a reply to nothing this phase sent, or a second one, is dropped with a reason."""
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    got: dict[int, Message] = {}
    for r in replies:
        nid = asked.get(r.metadata.reply_to_message_id)
        if nid is None:
            drop(int(r.metadata.src_node_id), "reply to a message this phase did not send")
        elif nid in got:
            drop(nid, "second reply in one phase (the first one is kept)")
        else:
            got[nid] = r
    return got
