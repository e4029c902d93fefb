"""Fewer bytes per value on the wire: float16 or int8 encodings of a dict of float32 arrays (no Flower, no torch).

`value-dtype` (run config) picks the form of every value vector that travels in a training or evaluation
message, both ways, for every method (the packed taskedge values, taskedge-lora's B, fedlora's adapters,
the dense head, fedavg-full's weights):

* ``float32``: the arrays as they are (the default; nothing here runs).
* ``float16``: each array cast to float16 (relative error <= 2^-11 per entry in float16's normal range,
  absolute error <= 2^-25 below it); |value| above float16's largest finite number (65504) is refused.
* ``int8``: per tensor one float32 scale s = max|x| / 127 and int8 codes q with x ~ q * s, rounded
  stochastically and without bias: q = floor(x / s + u), u ~ U[0, 1) from a seeded numpy Generator,
  so E[q * s] = x and |q * s - x| < s per entry. The wire carries the int8 array under the array's key
  and its scale as a float32 array of shape (1,) under '<key>#scale'. A mean of N such encodings with
  independent rounding is off the float32 mean by less than max(s) per entry, typically by about
  max(s) / (2 sqrt(N)).

Which arrays are encoded is the caller's choice: the federation sends the global arrays themselves
down (a node keeps no state a reference could live in) and each node's *update* (trained minus
what it received) up, so int8's 255 levels are spent on the small delta, not on the weights
(`encode_update` / `decode_update`). Everything on the wire is a plain numpy array; `decode` checks
keys, dtypes, shapes and scales and names the field it refuses (`QuantizeError`).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

DTYPES = ("float32", "float16", "int8")
SCALE_SUFFIX = "#scale"
INT8_LEVELS = 127  # codes in [-127, 127]: symmetric, so 0 encodes exactly
FP16_MAX = float(np.finfo(np.float16).max)


class QuantizeError(ValueError):
    """An array that cannot be encoded, or an encoded record that does not decode; names the field."""


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise QuantizeError(f"value-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def scale_key(key: str) -> str:
    return key + SCALE_SUFFIX


def quantize_int8(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.float32]:
    """(int8 codes, scale) of one array: scale = max|x| / 127, unbiased stochastic rounding."""
    x = np.asarray(x, dtype=np.float32)
    amax = float(np.abs(x).max()) if x.size else 0.0
    scale = np.float32(amax / INT8_LEVELS)
    if scale == 0 or not np.isfinite(scale):
        if not np.isfinite(scale):
            raise QuantizeError("max |value| is not finite")
        return np.zeros(x.shape, np.int8), np.float32(0.0)
    y = x.astype(np.float64) / float(scale)
    q = np.floor(y + rng.random(x.shape))
    return np.clip(q, -INT8_LEVELS, INT8_LEVELS).astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: float) -> np.ndarray:
    return (np.asarray(q, np.float32) * np.float32(scale)).astype(np.float32)


def encode(arrays: Mapping[str, np.ndarray], dtype: str, rng: np.random.Generator | None = None
           ) -> "OrderedDict[str, np.ndarray]":
    """The wire form of float arrays under `dtype` (see the module doc); `rng` makes int8 reproducible."""
    _check_dtype(dtype)
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    rng = rng if rng is not None else np.random.default_rng()
    for key, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.dtype.kind != "f":
            raise QuantizeError(f"field '{key}': expected a float array to encode, got {arr.dtype}")
        if not np.isfinite(arr).all():
            raise QuantizeError(f"field '{key}': contains NaN/Inf, cannot encode")
        if dtype == "float32":
            out[key] = np.ascontiguousarray(arr, np.float32)
        elif dtype == "float16":
            if arr.size and float(np.abs(arr).max()) > FP16_MAX:
                raise QuantizeError(f"field '{key}': |value| {float(np.abs(arr).max()):.3g} exceeds float16's range "
                                    f"({FP16_MAX:g}); use value-dtype int8 or float32")
            out[key] = np.ascontiguousarray(arr, np.float16)
        else:
            if scale_key(key) in arrays:
                raise QuantizeError(f"field '{key}': its scale key '{scale_key(key)}' is taken by another array")
            q, s = quantize_int8(arr, rng)
            out[key] = np.ascontiguousarray(q)
            out[scale_key(key)] = np.array([s], np.float32)
    return out


def encoded_specs(shapes: Mapping[str, tuple[int, ...]], dtype: str) -> "OrderedDict[str, tuple[tuple[int, ...], str]]":
    """key -> (shape, dtype name) of the encoded record for float arrays of these shapes."""
    _check_dtype(dtype)
    out: OrderedDict = OrderedDict()
    for key, shape in shapes.items():
        out[key] = (tuple(shape), dtype)
        if dtype == "int8":
            out[scale_key(key)] = ((1,), "float32")
    return out


def encoded_nbytes(shapes: Mapping[str, tuple[int, ...]], dtype: str) -> int:
    """Payload bytes of the encoded arrays (no keys, no headers): the communication bound."""
    return int(sum(np.dtype(dt).itemsize * int(np.prod(shape)) for shape, dt in encoded_specs(shapes, dtype).values()))


def decode(encoded: Mapping[str, np.ndarray], dtype: str, shapes: Mapping[str, tuple[int, ...]] | None = None
           ) -> "OrderedDict[str, np.ndarray]":
    """float32 arrays from their wire form. `shapes` (key -> shape): the exact keys and shapes expected; None:
    the keys the record names (scales excluded). Raises QuantizeError naming the field."""
    _check_dtype(dtype)
    keys = list(shapes) if shapes is not None else [k for k in encoded if not (dtype == "int8"
                                                                              and k.endswith(SCALE_SUFFIX))]
    allowed = set(encoded_specs({k: () for k in keys}, dtype))
    extra = [k for k in encoded if k not in allowed]
    if extra:
        raise QuantizeError(f"field '{extra[0]}': not expected in a value-dtype={dtype} record")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key in keys:
        if key not in encoded:
            raise QuantizeError(f"field '{key}': missing")
        arr = np.asarray(encoded[key])
        if arr.dtype != np.dtype(dtype):
            raise QuantizeError(f"field '{key}': expected {dtype} values for value-dtype={dtype}, got {arr.dtype}")
        if shapes is not None and arr.shape != tuple(shapes[key]):
            raise QuantizeError(f"field '{key}': shape {arr.shape} does not match the expected {tuple(shapes[key])}")
        if dtype == "int8":
            sk = scale_key(key)
            if sk not in encoded:
                raise QuantizeError(f"field '{key}': no per-tensor scale '{sk}' (value-dtype=int8)")
            s = np.asarray(encoded[sk])
            if s.dtype != np.float32 or s.shape != (1,):
                raise QuantizeError(f"field '{sk}': expected a float32 array of shape (1,), got {s.dtype} {s.shape}")
            if not np.isfinite(s[0]) or s[0] < 0:
                raise QuantizeError(f"field '{sk}': scale must be finite and >= 0, got {float(s[0])!r}")
            if arr.size and int(arr.min()) < -INT8_LEVELS:
                raise QuantizeError(f"field '{key}': code -128 is outside the encoder's [-127, 127]")
            out[key] = dequantize_int8(arr, float(s[0]))
        else:
            val = arr.astype(np.float32)
            if not np.isfinite(val).all():
                raise QuantizeError(f"field '{key}': contains NaN/Inf")
            out[key] = val
    return out


def encode_update(trained: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], dtype: str,
                  rng: np.random.Generator | None = None) -> "OrderedDict[str, np.ndarray]":
    """The wire form of `trained - reference` (keys of `trained`; shapes must agree)."""
    delta: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, arr in trained.items():
        if key not in reference:
            raise QuantizeError(f"field '{key}': no reference array to take the update against")
        ref = np.asarray(reference[key], np.float32)
        arr = np.asarray(arr, np.float32)
        if arr.shape != ref.shape:
            raise QuantizeError(f"field '{key}': shape {arr.shape} does not match the reference {ref.shape}")
        delta[key] = arr - ref
    return encode(delta, dtype, rng)


def decode_update(encoded: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], dtype: str
                  ) -> "OrderedDict[str, np.ndarray]":
    """`reference + update` for an update encoded by `encode_update` (keys and shapes: the reference's)."""
    shapes = OrderedDict((k, tuple(np.shape(v))) for k, v in reference.items())
    delta = decode(encoded, dtype, shapes)
    return OrderedDict((k, (np.asarray(reference[k], np.float32) + delta[k]).astype(np.float32)) for k in shapes)
