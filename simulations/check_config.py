"""Check a `flwr run` configuration before any Flower process starts (fail fast, in well under a second).

    python -m simulations.check_config -n 5 --run-config "num-server-rounds=2 method='fedlora'"

Merges `[tool.flwr.app.config]` of pyproject.toml with the `--run-config` overrides (parsed the way
`flwr run --run-config` parses them: space-separated `key=value` pairs, TOML values, quotes for
strings), validates the result with the app's own `parse_run_config`, and checks the combinations
that would otherwise only show up later as a run waiting forever (fewer simulated nodes than
`min-nodes`) or skipping every round (`min-replies` above the number of nodes).

On a problem: one line on stderr naming the key, the value and the expected form; exit code 2.
On success: nothing (exit 0), or with `--print KEY` the merged value of KEY on stdout.
Other `flwr run` arguments (the app folder, `--stream`, ...) are accepted and ignored, so the
wrapper can pass its whole command line. Imports only the settings module and a TOML reader:
no torch, no flwr (importing flwr alone costs ~0.6 s).
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (flwr itself needs 3.11); tomli comes with flwr
    import tomli as tomllib

from common.settings import DEFAULTS, parse_run_config

ROOT = Path(__file__).resolve().parents[1]

# flwr.common.config.parse_config_args: `key=value`, the value a quoted string or a run of non-spaces
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")
_FORMAT = "expected space-separated key=value pairs, e.g. \"num-server-rounds=3 lr=0.01 method='fedlora'\""


class ConfigError(ValueError):
    """A configuration problem; its message is the one line shown to the user."""


def parse_overrides(values: list[str] | None, option: str = "--run-config") -> dict[str, Any]:
    """`flwr run --run-config` semantics (flwr 1.42 `parse_config_args`), without importing flwr.

    Each value holds `k=v` pairs; later pairs win. A single value ending in `.toml` is a file whose
    (flattened) table is the override. Unlike flwr, text that is not a `k=v` pair is an error here:
    flwr drops it silently (`num-server-rounds = 3` with spaces is ignored).
    """
    if not values:
        return {}
    if len(values) == 1 and values[0].endswith(".toml"):
        try:
            with Path(values[0]).expanduser().open("rb") as fh:
                return _flatten(tomllib.load(fh))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"{option} {values[0]!r}: cannot read this TOML file ({err})") from None
    out: dict[str, Any] = {}
    for value in values:
        if not value:
            continue
        if value.endswith(".toml"):
            raise ConfigError(f"{option} {value!r}: a TOML file cannot be combined with key=value pairs")
        leftover = _PAIR.sub("", value).strip()
        if leftover:
            where = "" if leftover == value.strip() else f" in {value!r}"
            raise ConfigError(f"{option}: cannot parse {leftover!r}{where}; {_FORMAT}")
        for key, raw in _PAIR.findall(value):
            try:
                out.update(_flatten(tomllib.loads(f"{key} = {raw}")))
            except tomllib.TOMLDecodeError:
                hint = " (strings need quotes: key='text')" if raw[:1] not in "'\"" else ""
                raise ConfigError(f"{option} '{key}': cannot parse value {raw!r}{hint}; {_FORMAT}") from None
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        flat.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return flat


def app_config(pyproject: Path) -> dict[str, Any]:
    """`[tool.flwr.app.config]` of the app's pyproject.toml."""
    try:
        with pyproject.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read {pyproject}: {err}") from None
    return _flatten(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _unknown(key: str, value: Any) -> ConfigError:
    close = difflib.get_close_matches(key, list(DEFAULTS), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "see [tool.flwr.app.config] in pyproject.toml for the keys"
    return ConfigError(f"run config '{key}': unknown key (value {value!r}); {hint}")


def check(run_config: list[str] | None = None, *, nodes: int | None = None, federation_config: list[str] | None = None,
          pyproject: Path = ROOT / "pyproject.toml") -> dict[str, Any]:
    """The merged, validated run configuration (kebab-case dict); raises ConfigError with one line."""
    base = app_config(pyproject)
    overrides = parse_overrides(run_config)
    for key, value in overrides.items():
        if key in DEFAULTS and key not in base:  # flwr rejects override keys missing from the app config
            raise ConfigError(f"run config '{key}': a valid setting, but `flwr run` only overrides keys listed in "
                              f"[tool.flwr.app.config] of {pyproject.name}; add `{key} = {_toml(DEFAULTS[key])}` there")
        if key not in base:
            raise _unknown(key, value)
    merged = {**base, **overrides}
    for key, value in merged.items():
        if key not in DEFAULTS:
            raise _unknown(key, value)
    try:
        cfg = parse_run_config(merged).to_dict()
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0]) from None

    fed = parse_overrides(federation_config, "--federation-config")
    source = f"-n {nodes}"
    if "num-supernodes" in fed:
        nodes, source = fed["num-supernodes"], f"num-supernodes={fed['num-supernodes']}"
    if nodes is not None:
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise ConfigError(f"number of simulated nodes: must be an integer >= 1, got {nodes!r} (e.g. -n 5)")
        have = f"{nodes} simulated node{'s' if nodes != 1 else ''} ({source})"
        if cfg["min-nodes"] > nodes:
            raise ConfigError(f"run config 'min-nodes': {cfg['min-nodes']} is more than the {have}; the run would "
                              f"wait forever; expected min-nodes <= {nodes} or -n >= {cfg['min-nodes']}")
        if cfg["min-replies"] > nodes:
            raise ConfigError(f"run config 'min-replies': {cfg['min-replies']} is more than the {have}; every round "
                              f"would be skipped; expected min-replies <= {nodes}")
        if 0 < cfg["num-partitions"] < nodes:
            raise ConfigError(f"run config 'num-partitions': {cfg['num-partitions']} is less than the {have}; "
                              f"expected 0 (one partition per node) or >= {nodes}")
    _check_files(cfg)
    return cfg


def _check_files(cfg: dict[str, Any]) -> None:
    """The user's weights file and data folders (common/preflight.py, no torch: well under a second), then, only
    when a timm model or a weights file is named, the model name and the file's keys and shapes against the
    model built on the meta device (torch + timm, a few seconds). One line naming the key on a problem."""
    from common import preflight

    weights, model = cfg.get("weights-path", ""), cfg.get("model", DEFAULTS.get("model", ""))
    local_weights = weights not in ("", "hub")
    problems = [preflight.weights_file(weights) if local_weights else "",
                *(preflight.data_path(cfg[key], key) for key in ("data-path", "server-data-path") if cfg.get(key))]
    if not any(problems) and (model != DEFAULTS.get("model") or local_weights):
        problems.append(preflight.model_name(model))
        if not problems[-1] and local_weights:
            problems.append(preflight.model_fits(model, weights, cfg.get("img-size", 0) or 0))
    problem = next((p for p in problems if p), "")
    if problem:
        key, _, rest = problem.partition(" ")
        raise ConfigError(f"run config '{key}': {rest}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulations.check_config", allow_abbrev=False,
                                description="Validate a `flwr run` configuration without starting Flower.")
    p.add_argument("-n", "--nodes", type=int, default=None, help="number of simulated nodes (run_flwr.sh -n)")
    p.add_argument("--run-config", action="append", default=None, metavar="PAIRS",
                   help="key=value overrides, as for `flwr run --run-config` (repeatable; later wins)")
    p.add_argument("--federation-config", action="append", default=None, metavar="PAIRS",
                   help="as for `flwr run --federation-config`; num-supernodes replaces -n")
    p.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml", help="the app's pyproject.toml")
    p.add_argument("--print", dest="print_key", default=None, metavar="KEY",
                   help="print the merged value of KEY on stdout (e.g. output-dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    args, _ = _parser().parse_known_args(argv)  # other `flwr run` arguments are not ours to check
    try:
        cfg = check(args.run_config, nodes=args.nodes, federation_config=args.federation_config,
                    pyproject=args.pyproject)
        if args.print_key is not None:
            if args.print_key not in cfg:
                raise _unknown(args.print_key, None)
            print(cfg[args.print_key])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
