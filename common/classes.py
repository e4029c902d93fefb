"""The federation's classes: named by the data, agreed across nodes, fixed by the server.

An ImageFolder numbers its classes by its own folder names, so label 2 on one node and label 2 on
another need not be the same class; names are what nodes can agree on. Each node reports the class
names of its dataset (not the labels its partition happens to hold); the server fixes the global list
(the run config's `class-names`, else the sorted union of the reports) and sends it with every
message; a node maps its labels onto it by name and refuses to train if it holds a class outside it.
No Flower here: the server phase is `server/phases.py: classes_phase`, the node side `client/`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

MAX_CLASSES = 100_000
MAX_NAME = 256


def parse_class_names(text: str) -> list[str]:
    """The run-config form: a JSON list of strings, or comma-separated names ("" = none given)."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list of strings ({exc.msg})") from None
    else:
        names = [n.strip() for n in text.split(",")]
    check_names(names)
    return list(names)


def check_names(names: Sequence) -> None:
    """A usable class list: strings, non-empty, unique, bounded in number and length."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError("class names must be a list of strings")
    if not 0 < len(names) <= MAX_CLASSES:
        raise ValueError(f"{len(names)} class names; expected 1 to {MAX_CLASSES}")
    bad = next((n for n in names if not n or len(n) > MAX_NAME), None)
    if bad is not None:
        raise ValueError(f"class name {bad[:40]!r} is empty or longer than {MAX_NAME} characters")
    if len(set(names)) != len(names):
        dup = next(n for n in names if list(names).count(n) > 1)
        raise ValueError(f"class name {dup!r} appears twice")


def global_classes(reports: Iterable[Sequence[str]], fixed: Sequence[str] = (), num_classes: int = 0) -> list[str]:
    """The federation's class list: `fixed` (run config), else the nodes' list when they all report the same
    (partitions of one dataset: its order is kept), else the sorted union of the reports; padded with numbered
    names up to `num-classes` when that is larger. Fewer than 2: an error."""
    reports = [list(r) for r in reports]
    if fixed:
        names = list(fixed)
    elif reports and all(r == reports[0] for r in reports):
        names = reports[0]
    else:
        names = sorted({n for r in reports for n in r})
    if num_classes and num_classes < len(names):
        raise ValueError(f"run config 'num-classes'={num_classes} is smaller than the {len(names)} classes the "
                         f"data names ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    names += [f"class-{i}" for i in range(len(names), num_classes)]
    if len(names) < 2:
        raise ValueError(f"one class only ({names[0] if names else 'none'}): a classifier needs at least 2; "
                         f"check data-path (one sub-folder per class) or set class-names")
    return names


def label_map(local: Sequence[str], global_names: Sequence[str]):
    """Index array (numpy int64) taking a node's label i (its i-th class name) to the global index; refuses, naming
    them, local classes the federation does not have."""
    index = {n: i for i, n in enumerate(global_names)}
    outside = [n for n in local if n not in index]
    if outside:
        raise ValueError(f"this node's data has classes outside the federation's {len(global_names)}: "
                         f"{', '.join(map(repr, outside[:5]))}{' ...' if len(outside) > 5 else ''}")
    import numpy as np  # not at import: check_config reads this module without numpy

    return np.array([index[n] for n in local], np.int64)
