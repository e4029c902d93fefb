"""The server's side of `value-dtype` (common/quantize.py): encode the broadcast, decode the replies.

Used by the reply guard (server/guard.py), so everything inside it (clipping, DP wrappers, FedAvg and
the nested means) sees plain float32 arrays, and the bytes it books are the encoded bytes.

* Down (training and evaluation messages): the global arrays themselves, encoded once per round (the
  same stochastic rounding for every node of the round). A node has no state to hold a reference the
  server could take a delta against, and for the travelling methods the global values are deltas or
  adapters already (taskedge values and B start at 0); fedavg-full's int8 broadcast is a per-tensor
  int8 copy of the full weights every round (use float16 there).
* Up: a node sends its update, trained minus what it decoded (client/codec.py); the server adds it to
  ITS float32 global: the downlink's rounding noise never accumulates in the server's state, and
  entries a nested node did not train come back exactly as sent (an update of 0 encodes exactly).
The encoded record is checked from its metadata first (dtype, shape, byte size, scale present) and
then decoded; a reply that fails is refused with a BadReply that names the field, like any other.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message

from common import quantize
from common.quantize import QuantizeError

from . import validate
from .messages import array_record

ARRAYS = "arrays"


class ValueCodec:
    def __init__(self, dtype: str, seed: int = 0):
        if dtype not in quantize.DTYPES:
            raise ValueError(f"run config 'value-dtype': must be one of {', '.join(quantize.DTYPES)}, got {dtype!r}")
        self.dtype, self.seed = dtype, seed

    @property
    def active(self) -> bool:
        return self.dtype != "float32"

    def broadcast(self, messages: Iterable[Message], arrays: ArrayRecord, server_round: int,
                  phase: int) -> list[Message]:
        """The messages with their global arrays encoded (one encoding per call, shared by every message)."""
        messages = list(messages)
        if not self.active or not messages:
            return messages
        conf = messages[0].content.get("config")
        offset = int(conf.get("round-offset", 0)) if conf is not None else 0
        rng = np.random.default_rng([self.seed, offset + server_round, phase])
        encoded = array_record(quantize.encode({k: v.numpy() for k, v in arrays.items()}, self.dtype, rng))
        for m in messages:
            if ARRAYS in m.content:
                m.content[ARRAYS] = encoded
        return messages

    def bound_bytes(self, specs: Mapping[str, tuple[tuple[int, ...], str]]) -> float:
        """Payload bytes of one encoded reply (the fp32 bound is 4 bytes per entry)."""
        return float(quantize.encoded_nbytes({k: s for k, (s, _) in specs.items()}, self.dtype))

    def decode_reply(self, reply: Message, specs: Mapping[str, tuple[tuple[int, ...], str]],
                     reference: Mapping[str, np.ndarray]) -> None:
        """Replace a training reply's encoded update by the float32 arrays reference + update (BadReply if it
        does not decode); a reply without an arrays record is left to the validation that follows."""
        if not self.active or reply.has_error() or ARRAYS not in reply.content:
            return
        rec = reply.content[ARRAYS]
        if not isinstance(rec, ArrayRecord):
            return
        want = quantize.encoded_specs({k: s for k, (s, _) in specs.items()}, self.dtype)
        unknown = sorted(set(rec.keys()) - set(want))
        if unknown:
            raise validate.BadReply(f"value-dtype={self.dtype}: unknown field '{unknown[0]}'")
        missing = [k for k in want if k not in rec]
        if missing:
            base = missing[0]
            what = (f"no per-tensor scale '{base}'" if base.endswith(quantize.SCALE_SUFFIX)
                    else f"missing field '{base}'")
            raise validate.BadReply(f"value-dtype={self.dtype}: {what}")
        try:
            raw = {k: validate.decode_array(rec, k, shape, dt) for k, (shape, dt) in want.items()}
        except validate.BadReply as exc:
            raise validate.BadReply(f"value-dtype={self.dtype}: {exc}") from None
        try:
            decoded = quantize.decode_update(raw, reference, self.dtype)
        except QuantizeError as exc:
            raise validate.BadReply(f"value-dtype={self.dtype}: {exc}") from None
        reply.content[ARRAYS] = array_record(decoded)
