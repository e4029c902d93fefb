"""A Grid that delivers messages to a ClientApp in this very process (no Ray, no SuperLink).

For tests and benchmarks: the strategy and the ClientApp handlers are exactly the ones that run
under `flwr run`; only transport is replaced. Like the real runtime, every message is passed
through its serialised form (deflate/inflate of the content), each node keeps its own
`Context` (with a persistent `state`) and an exception in a handler becomes an error reply.
`tamper(node_id, reply) -> reply` lets tests corrupt replies on the way back; `observe(message,
reply)` sees every delivered pair.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from .messages import content_bytes, message_bytes, stamp


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1):
    """Messages built outside a Flower runtime need a process-wide TaskIdentity (flwr >= 1.38)."""
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def _roundtrip(content: RecordDict) -> RecordDict:
    """Serialise and parse a RecordDict like the transport does (arrays become fresh bytes)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objs = get_all_nested_objects(content)
    return inflate_object_from_contents(content.object_id, {oid: o.deflate() for oid, o in objs.items()})


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict | None = None,
                 node_configs: dict[int, dict] | None = None, tamper: Callable[[int, Message], Message] | None = None,
                 serialize: bool = True, observe: Callable[[Message, Message], None] | None = None):
        self.client_app, self.tamper, self.serialize, self.observe = client_app, tamper, serialize, observe
        self.contexts: dict[int, Context] = {}
        for pid in range(num_nodes):
            nid = 1000 + pid
            nc = {"partition-id": pid, "num-partitions": num_nodes, **(node_configs or {}).get(pid, {})}
            self.contexts[nid] = Context(run_id=1, node_id=nid, node_config=nc, state=RecordDict(),
                                         run_config=dict(run_config or {}))
        self._run = None
        self._outbox: dict[str, Message] = {}
        self.delivered: list[dict] = []  # per message: type, node, record names, bytes down/up

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, msg: Message) -> Message:
        stamp(msg)
        nid = msg.metadata.dst_node_id
        conf = msg.content.get("config")
        log = {"type": msg.metadata.message_type, "node": nid, "round": conf.get("server-round") if conf else None,
               "records": sorted(msg.content.keys()), "down": content_bytes(msg.content)}
        self.delivered.append(log)
        if self.serialize:
            msg = Message(_roundtrip(msg.content), metadata=msg.metadata)
        try:
            reply = self.client_app(msg, self.contexts[nid])
        except Exception as exc:  # the runtime turns handler exceptions into error replies
            reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        if self.serialize and not reply.has_error():
            reply = Message(_roundtrip(reply.content), metadata=reply.metadata)
        reply = self.tamper(nid, reply) if self.tamper else reply
        if self.observe is not None:
            self.observe(msg, reply)
        log["up"] = message_bytes(reply)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{len(self._outbox) + i}"
            self._outbox[mid] = self._deliver(msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._outbox.pop(m) for m in message_ids if m in self._outbox]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self._deliver(m) for m in messages]
