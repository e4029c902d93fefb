"""Server and nodes must hold the same frozen backbone, and a deployment never re-trains it silently.

* `backbone_fingerprint`: sha256 of the backbone as loaded (head excluded); the statistics query carries the
  server's, a node on another backbone refuses (both fingerprints named) and is dropped, plainly and in
  SecAgg+ (there as a dropout whose reason reaches the record).
* Missing shipped weights: a one-line error naming TASKEDGE_WEIGHTS_DIR, at once, instead of pre-training;
  other upstream tasks still pre-train on first use.
* A `common` imported from a FAB finds the weights of the installed `taskedge-fl` distribution.
"""
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from safetensors.torch import load_file, save_file

from client.client_app import create_app
from common import backbones as B
from common import models as M
from common.architectures import DEFAULT_MODEL
from common.data.tasks import UPSTREAM_TASK
from common.methods import pretrained_base
from common.settings import parse_run_config
from server.inprocess import InProcessGrid
from server.privacy import Privacy
from server.recorder import RoundLog
from server.runner import run_federation

FNAME, SHA = B.EMBEDDED_WEIGHTS[DEFAULT_MODEL]
SHIPPED = Path(B.__file__).resolve().parent / "weights" / FNAME


def _cfg(tmp_path, **kw):
    base = {"num-partitions": 20, "num-server-rounds": 1, "server-test-size": 0, "calib-size": 32,
            "batch-size": 32, "output-dir": str(tmp_path), "min-nodes": 1, "fraction-evaluate": 0.0}
    base.update({k.replace("_", "-"): v for k, v in kw.items()})
    return parse_run_config(base)


@pytest.fixture(scope="module")
def other_weights(weights, tmp_path_factory):
    """The conftest weights with one entry of one backbone tensor changed (what a node re-trained elsewhere holds)."""
    sd = load_file(weights)
    sd["blocks.0.attn.qkv.weight"][0, 0] += 1e-3
    path = tmp_path_factory.mktemp("other") / "tiny-other.safetensors"
    save_file(sd, str(path))
    return str(path)


def _node_weights(node: int, path: str):
    """A mod that makes one node load another weights file at the run's weights-path (its own disk)."""
    def mod(msg, context, call_next):
        if context.node_id == node and "config" in msg.content:
            msg.content["config"] = ConfigRecord({**dict(msg.content["config"].items()), "weights-path": path})
        return call_next(msg, context)

    return mod


def _fp(path: str) -> str:
    return M.backbone_fingerprint(M.create_model(DEFAULT_MODEL, num_classes=10, weights=path))


# ------------------------------------------------------------------ the fingerprint
def test_fingerprint_is_stable_across_builds_and_changes_with_one_entry(weights):
    a = M.create_model(DEFAULT_MODEL, num_classes=10, weights=weights)
    b = M.create_model(DEFAULT_MODEL, num_classes=3, weights=weights)  # another head: not part of the backbone
    fp = M.backbone_fingerprint(a)
    assert len(fp) == 64 and M.backbone_fingerprint(b) == fp
    assert M.backbone_fingerprint(a) == fp  # cached
    with torch.no_grad():
        a.head.weight.add_(1.0)
    assert M.backbone_fingerprint(a) == fp  # the head never counts
    with torch.no_grad():
        a.blocks[0].attn.qkv.weight[0, 0] += 1e-6  # in place on the same object: the cache notices
    changed = M.backbone_fingerprint(a)
    assert changed != fp
    c = M.create_model(DEFAULT_MODEL, num_classes=10, weights=weights)
    c.load_state_dict(a.state_dict())
    assert M.backbone_fingerprint(c) == changed
    assert M.backbone_fingerprint(c.to(torch.float64)) != changed  # dtype is part of it


# ------------------------------------------------------------------ a node on another backbone
def test_node_with_another_backbone_is_refused_and_dropped_with_both_fingerprints(weights, other_weights, tmp_path):
    cfg = _cfg(tmp_path, weights_path=weights)
    bad = 1001
    grid = InProcessGrid(create_app(mods=(_node_weights(bad, other_weights),)), 3, cfg.to_dict())
    fed, summary = run_federation(grid, cfg)
    reasons = [d["reason"] for d in fed.dropped if d["node"] == bad]
    assert reasons and reasons[0].startswith("statistics: ") and fed.dropped[0]["round"] == 0
    server, node = _fp(weights)[:12], _fp(other_weights)[:12]
    for why in reasons:  # statistics, then every later mask delivery it is offered
        assert server in why and node in why and "backbone mismatch" in why and "weights-path" in why
    assert all(d["node"] == bad for d in fed.dropped)
    assert fed.history[-1]["replies"] == 2  # the other nodes trained
    doc = json.loads((fed.run_dir / "results.json").read_text())
    assert any(f"node {bad}: statistics: " in r and server in r and node in r
               for r in doc["rounds"][0]["drop_reasons"])
    assert doc["status"].startswith("degraded") and server in doc["status"]  # a node never took part


def test_secure_statistics_refusal_is_a_dropout_with_the_reason(weights, other_weights, tmp_path):
    cfg = _cfg(tmp_path, weights_path=weights, secure_aggregation=True, clip_norm=1.0)
    bad = 1002
    grid = InProcessGrid(create_app(mods=(_node_weights(bad, other_weights),)), 4, cfg.to_dict())
    nodes, log = sorted(grid.get_node_ids()), RoundLog()
    mask = Privacy(cfg, log, None, nodes).statistics_phase(grid, nodes)
    assert mask is not None and log.rec["stats_secagg_active"] == 3
    assert [d["node"] for d in log.dropped] == [bad]
    why = log.dropped[0]["reason"]
    assert why.startswith("statistics: secure aggregation") and _fp(weights)[:12] in why and _fp(other_weights)[:12] in why


def test_same_backbone_is_not_refused_and_the_query_carries_the_fingerprint(weights, tmp_path):
    cfg = _cfg(tmp_path, weights_path=weights)
    sent = []
    grid = InProcessGrid(create_app(), 2, cfg.to_dict(), observe=lambda m, r: sent.append(m))
    fed, _ = run_federation(grid, cfg)
    assert not fed.dropped
    stats = [m for m in sent if m.metadata.message_type == "query.stats"]
    assert stats and all(m.content["config"][M.BACKBONE_KEY] == _fp(weights) for m in stats)


# ------------------------------------------------------------------ missing shipped weights
@pytest.fixture
def no_shipped(tmp_path, monkeypatch):
    """As in a FAB on a machine without the project: nothing beside the module, no variable, no distribution."""
    monkeypatch.setattr(B, "WEIGHTS_DIR", tmp_path / "fab" / "common" / "weights")
    monkeypatch.delenv(B.WEIGHTS_ENV, raising=False)
    monkeypatch.delenv(B.ALLOW_PRETRAIN_ENV, raising=False)
    monkeypatch.setattr(B, "installed_weights", lambda model=DEFAULT_MODEL: None)
    monkeypatch.setenv("TASKEDGE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pretrain(model=DEFAULT_MODEL, task=UPSTREAM_TASK, out=None, progress=True, device="cpu"):
        calls.append((model, task))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHIPPED, out)
        return str(out)

    monkeypatch.setattr(B, "pretrain", fake_pretrain)
    pretrained_base.cache_clear()
    yield calls
    pretrained_base.cache_clear()


def test_missing_shipped_weights_fail_at_once_naming_the_variable(no_shipped, tmp_path, monkeypatch):
    t0 = time.perf_counter()
    with pytest.raises(B.MissingWeightsError) as err:
        M.create_embedded(num_classes=10)
    msg = str(err.value)
    assert time.perf_counter() - t0 < 5 and "\n" not in msg
    assert "TASKEDGE_WEIGHTS_DIR" in msg and FNAME in msg and "pretrain_backbone" in msg
    assert no_shipped == [] and not (tmp_path / "cache").exists()  # nothing pre-trained, nothing cached
    # pre-training stays possible when asked for: the argument, or the variable
    assert Path(B.embedded_backbone(allow_pretrain=True, progress=False)).is_file() and len(no_shipped) == 1
    monkeypatch.setenv(B.ALLOW_PRETRAIN_ENV, "1")
    assert Path(B.embedded_backbone(progress=False)).is_file()
    # other upstream tasks pre-train on first use as before (tests and benchmarks rely on it)
    monkeypatch.delenv(B.ALLOW_PRETRAIN_ENV)
    B.embedded_backbone("shapes-downstream", progress=False)
    assert no_shipped[-1] == (DEFAULT_MODEL, "shapes-downstream")


def test_deployed_apps_without_weights_fail_naming_the_variable(no_shipped, tmp_path):
    cfg = _cfg(tmp_path)  # the embedded model, no weights-path: as `flwr run` from a FAB
    grid = InProcessGrid(create_app(), 2, cfg.to_dict())
    # a node: its statistics query fails with the one-line error (the server drops it with that reason)
    reply = grid.send_and_receive([Message(RecordDict({"config": ConfigRecord(cfg.client_config())}),
                                           dst_node_id=1000, message_type="query.stats", group_id="stats")])[0]
    assert reply.has_error() and "TASKEDGE_WEIGHTS_DIR" in reply.error.reason
    # the ServerApp: the run stops at its first use of the backbone, naming the variable
    t0 = time.perf_counter()
    with pytest.raises(B.MissingWeightsError, match="TASKEDGE_WEIGHTS_DIR"):
        run_federation(grid, cfg)
    assert time.perf_counter() - t0 < 60 and no_shipped == []


# ------------------------------------------------------------------ the installed distribution
def _site(tmp_path: Path, monkeypatch, direct_url: str | None = None, record: list[str] = ()) -> Path:
    """A site-packages folder holding a `taskedge-fl` distribution, first on sys.path."""
    site = tmp_path / "site"
    info = site / "taskedge_fl-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: taskedge-fl\nVersion: 0.1.0\n")
    (info / "RECORD").write_text("".join(f"{r},,\n" for r in [*record, "taskedge_fl-0.1.0.dist-info/METADATA"]))
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps({"url": direct_url, "dir_info": {"editable": True}}))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(B, "WEIGHTS_DIR", tmp_path / "fab" / "common" / "weights")  # a FAB: nothing beside it
    monkeypatch.delenv(B.WEIGHTS_ENV, raising=False)
    monkeypatch.delenv(B.ALLOW_PRETRAIN_ENV, raising=False)
    return site


def test_editable_install_weights_are_found_from_a_fab(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    (checkout / "common" / "weights").mkdir(parents=True)
    shutil.copy(SHIPPED, checkout / "common" / "weights" / FNAME)
    _site(tmp_path, monkeypatch, direct_url=checkout.as_uri())
    assert B.shipped_weights() == checkout / "common" / "weights" / FNAME
    assert B.embedded_backbone(progress=False) == str(checkout / "common" / "weights" / FNAME)


def test_wheel_install_weights_are_found_from_a_fab(tmp_path, monkeypatch):
    site = _site(tmp_path, monkeypatch, record=[f"common/weights/{FNAME}"])
    (site / "common" / "weights").mkdir(parents=True)
    shutil.copy(SHIPPED, site / "common" / "weights" / FNAME)
    assert B.installed_weights() == site / "common" / "weights" / FNAME
    assert B.shipped_weights() == site / "common" / "weights" / FNAME


def test_installed_weights_with_another_hash_are_not_used(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    (checkout / "common" / "weights").mkdir(parents=True)
    sd = load_file(str(SHIPPED))
    sd["blocks.0.attn.qkv.weight"][0, 0] += 1.0  # a re-trained file: other bits
    save_file(sd, str(checkout / "common" / "weights" / FNAME))
    _site(tmp_path, monkeypatch, direct_url=checkout.as_uri())
    assert B.installed_weights() is None and B.shipped_weights() is None
    with pytest.raises(B.MissingWeightsError, match="TASKEDGE_WEIGHTS_DIR"):
        B.embedded_backbone(progress=False)
