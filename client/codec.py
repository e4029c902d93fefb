"""The node's side of `value-dtype` (common/quantize.py; the server's side: server/codec.py).

`value_codec_mod` is the outermost ClientApp mod. On a training or evaluation message whose config says
value-dtype float16 / int8 it decodes the global arrays before anything else sees them (the privacy mods'
DP clipping and the handlers work on float32 arrays as always), and on the training reply it replaces the
trained arrays by the encoded UPDATE, trained minus what it decoded: int8's levels go to the small
delta, not the weights, and an entry the node did not train (nested budgets) is an exact 0. The server
adds the update to its own float32 global. float32 (the default): the mod does nothing.
Stochastic rounding is seeded by (seed, round, node id), so a run is reproducible.
"""
from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType

from common import quantize

ARRAYS = "arrays"


def _record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def value_codec_mod(msg: Message, context: Context, call_next) -> Message:
    kind = msg.metadata.message_type
    conf = msg.content.get("config") if kind in (MessageType.TRAIN, MessageType.EVALUATE) else None
    dtype = str(conf.get("value-dtype", "float32")) if conf is not None else "float32"
    if dtype == "float32" or ARRAYS not in msg.content:
        return call_next(msg, context)
    received = quantize.decode({k: v.numpy() for k, v in msg.content[ARRAYS].items()}, dtype)
    msg.content[ARRAYS] = _record(received)
    reply = call_next(msg, context)
    if kind != MessageType.TRAIN or reply.has_error() or ARRAYS not in reply.content:
        return reply
    rnd = int(conf.get("round-offset", 0)) + int(conf.get("server-round", 0))
    rng = np.random.default_rng([int(conf.get("seed", 0)), rnd, int(context.node_id) % 2**63, 2])
    trained = {k: v.numpy() for k, v in reply.content[ARRAYS].items()}
    reply.content[ARRAYS] = _record(quantize.encode_update(trained, received, dtype, rng))
    return reply
