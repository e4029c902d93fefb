"""score='gradient' under SecAgg+, DP and N:M, and the size of its one-off upload.

In-process federations of the real apps on a random-init copy of the embedded ViT (3 nodes, as in
tests/test_privacy.py). The nodes' gradient sums travel in the statistics query: as float32 in the
clear, as a second vector of the secure sum with SecAgg+, as a second Gaussian release with DP.
"""
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.exception import PrivacyBudgetExhausted

from client.client_app import create_app
from common.methods import export, method_model, set_arrays
from common.settings import parse_run_config
from common.taskedge.allocation import Mask, nm_keep
from common.taskedge.config import TaskEdgeConfig
from common.taskedge.nm import check_nm
from common.taskedge.tuner import (calibrate, get_taskedge_model, merge_and_unload, nm_names, prune_score,
                                   score_modules, target_modules)
from server.inprocess import InProcessGrid, task_identity
from server.messages import record_bytes
from server.phases import server_model, statistics_phase
from server.privacy import Privacy, projected_epsilon
from server.recorder import RoundLog
from server.runner import run_federation

NODES, CALIB = 3, 32


def _cfg(weights, tmp_path, **kw):
    base = {"weights-path": weights, "num-partitions": 20, "num-server-rounds": 1, "server-test-size": 100,
            "calib-size": CALIB, "output-dir": str(tmp_path), "min-nodes": 2, "fraction-evaluate": 0.0,
            "score": "gradient"}
    return parse_run_config(base, **kw)


def _grid(cfg, sink: list | None = None, nodes: int = NODES) -> InProcessGrid:
    """The real apps; `sink` collects every node's statistics reply (the clear-text gradient sums)."""
    observe = None
    if sink is not None:
        def observe(msg, reply):
            if msg.metadata.message_type == "query.stats" and not reply.has_error():
                sink.append(reply)
    return InProcessGrid(create_app(), nodes, cfg.to_dict(), observe=observe)


def _grads(reply) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content["grads"].items()}


def _same_entries(a: Mask, b: Mask) -> int:
    return sum(int(np.intersect1d(a.indices[n].numpy(), b.indices[n].numpy()).size) for n in a.names())


def _identical(a: Mask, b: Mask) -> bool:
    return a.names() == b.names() and all(torch.equal(a.indices[n], b.indices[n]) for n in a.names())


@pytest.fixture(scope="module")
def plain(weights, tmp_path_factory):
    """The plain statistics phase: its mask, the nodes' replies and the round record."""
    cfg = _cfg(weights, tmp_path_factory.mktemp("plain"))
    replies, log = [], RoundLog()
    with task_identity():
        grid = _grid(cfg, replies)
        mask = statistics_phase(grid, cfg, sorted(grid.get_node_ids()), log)
    exact = {k: sum(_grads(r)[k].astype(np.float64) for r in replies) for k in _grads(replies[0])}
    return {"mask": mask, "replies": replies, "rec": dict(log.rec), "exact": exact, "nodes": sorted(grid.get_node_ids())}


def test_settings_take_the_gradient_score_with_secure_aggregation_dp_and_nm():
    for kw in (dict(secure_aggregation=True, clip_norm=1.0), dict(dp="server"), dict(dp="client"),
               dict(secure_aggregation=True, dp="client"), dict(nm="2:4"), dict(dp="client", nm="2:4")):
        assert parse_run_config(score="gradient", **kw).score == "gradient"
    assert parse_run_config().grad_clip_norm == 10.0
    with pytest.raises(ValueError, match=r"run config 'grad-clip-norm': must be > 0, got 0\.0"):
        parse_run_config(score="gradient", grad_clip_norm=0.0)
    with pytest.raises(ValueError, match="run config 'score'.*needs reconcile='stats'"):
        parse_run_config(score="gradient", reconcile="vote")


def test_secure_gradient_sums_equal_the_plain_sums_within_the_quantization_bound(plain, weights, tmp_path):
    """SecAgg+ sums the clipped gradient vectors: the server's pooled sums equal the nodes' plain sums up to
    the stated quantization bound, so the mask is the plain mask apart from near-ties. Why a tolerance on
    the mask: Flower quantizes with stochastic rounding, which moves every summed entry by < n steps
    (asserted below), so two entries of a row whose |Σ| are closer than that can swap. 2^28 levels
    (3 nodes x 2^28 < 2^32) make such a swap rare: 0-1 of 4,269 entries were seen (at the default 2^22,
    ~1 %); 99.9 % leaves room for 4."""
    cfg = _cfg(weights, tmp_path, secure_aggregation=True, clip_norm=1.0, secagg_quantization_range=2**28)
    log = RoundLog()
    privacy = Privacy(cfg, log, None, plain["nodes"])
    mask = privacy.statistics_phase(_grid(cfg), plain["nodes"])
    rec = log.rec
    assert rec["stats_secagg_active"] == NODES and rec["grad_clipped"] == 0
    # the secure sums, in the units of the wire ('.g' = Σ dL/dW): off by < n quantization steps of each node
    tol = rec["grad_quant_bound"] * cfg.calib_size
    assert 0 < tol < 1e-3
    worst = max(float(np.abs(privacy.pooled_grads[k] - v).max()) for k, v in plain["exact"].items())
    assert 0 < worst <= tol, (worst, tol)
    # the statistics are not released (score='gradient' without N:M builds its mask from the gradients only)
    assert privacy.pooled is None and "stats_clipped" not in rec
    assert _same_entries(mask, plain["mask"]) >= 0.999 * plain["mask"].num_entries
    # the bytes of the masked gradient vectors are booked apart: int64 ring elements, 8 bytes per entry
    entries = sum(v.size for v in plain["exact"].values())
    assert NODES * 8 * entries <= rec["grad_bytes_up"] <= rec["stats_bytes_up"] == rec["query_bytes_up"]


def test_plain_phase_clips_each_nodes_gradient_sums_as_the_dp_phase_does(plain, weights, tmp_path):
    """One node's gradient sums pull on |Σ| at most grad-clip-norm (x calib-size) in the plain phase too, with
    the DP phase's arithmetic: at a bound between the nodes' norms, the plain mask is the noise-free DP mask."""
    norms = sorted(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in _grads(r).values())) / CALIB
                   for r in plain["replies"])
    bound = float(norms[1]) * 0.999  # the two larger nodes are clipped, the smallest is not
    cfg = _cfg(weights, tmp_path, grad_clip_norm=bound)
    log = RoundLog()
    mask = statistics_phase(_grid(cfg), cfg, plain["nodes"], log)
    assert log.rec["grad_clipped"] == 2 and not _identical(mask, plain["mask"])
    dcfg = _cfg(weights, tmp_path, grad_clip_norm=bound, dp="server", dp_noise_multiplier=0.0)
    assert _identical(Privacy(dcfg, RoundLog(), None, plain["nodes"]).statistics_phase(_grid(dcfg), plain["nodes"]),
                      mask)


@pytest.mark.parametrize("kw", [dict(dp="server"), dict(dp="client")], ids=["dp-server", "dp-client"])
def test_dp_without_noise_gives_exactly_the_plain_mask(plain, weights, tmp_path, kw):
    """The DP release with noise multiplier 0 is the plain phase's arithmetic (the same clip to grad-clip-norm,
    the same float64 sums in the same order): the same mask, index for index."""
    cfg = _cfg(weights, tmp_path, dp_noise_multiplier=0.0, **kw)
    log = RoundLog()
    privacy = Privacy(cfg, log, None, plain["nodes"])
    mask = privacy.statistics_phase(_grid(cfg), plain["nodes"])
    assert _identical(mask, plain["mask"])
    for k, v in plain["exact"].items():
        np.testing.assert_allclose(privacy.pooled_grads[k], v, rtol=1e-12, atol=1e-12)
    assert log.rec["dp_grad_noise_std"] == 0.0 and "grad_clipped" not in log.rec  # no un-noised count in DP


def test_dp_gradient_release_is_clipped_noised_and_accounted(plain, weights, tmp_path):
    sigma = 0.5
    cfg = _cfg(weights, tmp_path, dp="server", dp_noise_multiplier=sigma)
    log = RoundLog()
    privacy = Privacy(cfg, log, None, plain["nodes"])
    np.random.seed(2)
    assert privacy.statistics_phase(_grid(cfg), plain["nodes"]) is not None
    bound = cfg.grad_clip_norm
    assert log.rec["dp_grad_noise_std"] == pytest.approx(sigma * bound) and log.rec["dp_grad_clip_norm"] == bound
    # every node is inside the bound, so the release is the exact sum + N(0, (sigma x bound)^2) per entry, in the
    # units of the clipped vector (sums / calib-size)
    noise = np.concatenate([(privacy.pooled_grads[k] - v).ravel() for k, v in plain["exact"].items()]) / cfg.calib_size
    assert abs(noise.mean()) < 4 * sigma * bound / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(sigma * bound, rel=0.02)  # 208,896 entries
    # the accountant charged one Gaussian release: the gradient sums (the statistics are not released)
    assert privacy.released is None and privacy.pooled is None
    spent = privacy.spent()
    assert spent["dp_releases"] == 1
    assert spent["dp_epsilon"] == pytest.approx(projected_epsilon(sigma, 0, cfg.dp_delta, sigma, 1, 20), rel=1e-9)
    # the paper score's statistics release costs the same; gradient + N:M releases both: two releases, more epsilon
    eps = {}
    for score, extra in (("taskedge", {}), ("gradient", {"nm": "2:4"})):
        c = _cfg(weights, tmp_path, dp="server", dp_noise_multiplier=sigma, score=score, **extra)
        p = Privacy(c, RoundLog(), None, plain["nodes"])
        assert p.statistics_phase(_grid(c), plain["nodes"]) is not None
        eps[score] = p.spent()
        assert (p.released is not None) and (p.pooled_grads is not None) == (score == "gradient")
    assert eps["taskedge"]["dp_releases"] == 1 and eps["taskedge"]["dp_epsilon"] == pytest.approx(spent["dp_epsilon"])
    assert eps["gradient"]["dp_releases"] == 2
    assert eps["gradient"]["dp_epsilon"] > 1.2 * eps["taskedge"]["dp_epsilon"]
    assert eps["gradient"]["dp_epsilon"] == pytest.approx(projected_epsilon(sigma, 0, cfg.dp_delta, sigma, 2, 20))
    # max-epsilon is checked against both releases together: a limit between one and two releases stops gradient +
    # N:M before anything is released, and lets the gradient score alone through
    limit = (eps["taskedge"]["dp_epsilon"] + eps["gradient"]["dp_epsilon"]) / 2
    for extra, stops in (({"nm": "2:4"}, True), ({}, False)):
        c = _cfg(weights, tmp_path, dp="server", dp_noise_multiplier=sigma, max_epsilon=limit, **extra)
        p = Privacy(c, RoundLog(), None, plain["nodes"])
        if stops:
            with pytest.raises(PrivacyBudgetExhausted, match="statistics release"):
                p.statistics_phase(_grid(c), plain["nodes"])
            assert p.spent()["dp_releases"] == 0
        else:
            assert p.statistics_phase(_grid(c), plain["nodes"]) is not None and p.spent()["dp_releases"] == 1
    # a node over the bound is scaled down to it: 3 nodes at norm <= 0.1 each (noise ~0)
    c = _cfg(weights, tmp_path, dp="server", grad_clip_norm=0.1, dp_stats_noise_multiplier=1e-12)
    p = Privacy(c, RoundLog(), None, plain["nodes"])
    p.statistics_phase(_grid(c), plain["nodes"])
    total = np.sqrt(sum((v ** 2).sum() for v in p.pooled_grads.values())) / c.calib_size
    assert 0.1 < total <= 0.3 + 1e-6


@pytest.mark.parametrize("kw", [dict(secure_aggregation=True, clip_norm=50.0), dict(dp="client"),
                                dict(secure_aggregation=True, dp="client")], ids=["secagg", "dp", "secagg+dp"])
def test_gradient_federation_runs_with_secure_aggregation_and_dp(weights, tmp_path, kw):
    sigma = 0.5
    cfg = _cfg(weights, tmp_path, dp_noise_multiplier=sigma, dp_clip_norm=1.0, **kw)
    fed, summary = run_federation(_grid(cfg), cfg)
    assert summary["rounds"] == 1 and summary["skipped_rounds"] == 0 and not fed.dropped
    setup = fed.history[0]
    assert setup["stats_nodes"] == NODES and fed.mask is not None and fed.mask.num_entries > 0
    assert 0 < summary["grad_upload_bytes_per_client"] <= summary["setup_upload_bytes_per_client"]
    if cfg.secure_aggregation:
        assert setup["stats_secagg_active"] == NODES and summary["secure_aggregation"]
    if cfg.dp != "none":  # before training: the gradient release alone (the training releases are Flower's)
        assert setup["dp_releases"] == 1 and setup["dp_grad_noise_std"] == pytest.approx(sigma * cfg.grad_clip_norm)
        assert setup["dp_epsilon"] == pytest.approx(projected_epsilon(sigma, 0, cfg.dp_delta, sigma, 1, 20))


def test_gradient_upload_is_float32_half_the_float64_bytes(plain, weights, tmp_path):
    """The one dense upload: float32 (autograd's own precision), the target weights only, booked on its own."""
    cfg = _cfg(weights, tmp_path)
    reply = plain["replies"][0]
    grads = _grads(reply)
    assert all(v.dtype == np.float32 for v in grads.values())
    targets = target_modules(server_model(cfg), cfg.taskedge_config())
    assert sorted(k[:-2] for k in grads) == sorted(targets)  # eligible target modules only
    entries = sum(v.size for v in grads.values())
    assert entries == sum(m.weight.numel() for m in targets.values())
    f32 = record_bytes(reply.content["grads"])
    f64 = record_bytes(ArrayRecord({k: Array(v.astype(np.float64)) for k, v in grads.items()}))
    assert f64 - f32 == 4 * entries and f32 <= 0.501 * f64
    rec = plain["rec"]  # the round record books the gradient bytes apart from the statistics query's
    assert rec["grad_bytes_up"] == sum(record_bytes(r.content["grads"]) for r in plain["replies"])
    assert rec["stats_replies"] == NODES and rec["grad_bytes_up"] < rec["stats_bytes_up"] == rec["query_bytes_up"]
    # and the run summary carries them per client
    fed, summary = run_federation(_grid(cfg), cfg)
    setup = fed.history[0]
    assert summary["grad_upload_bytes_per_client"] == setup["grad_bytes_up"] / NODES == f32
    assert summary["setup_upload_bytes_per_client"] == setup["stats_bytes_up"] / NODES
    paper = _cfg(weights, tmp_path, score="taskedge")
    _, taskedge = run_federation(_grid(paper), paper)
    assert taskedge["grad_upload_bytes_per_client"] is None and taskedge["setup_upload_bytes_per_client"] > 0


def _labelled(n=3, bs=5, classes=4):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(bs, 3, 16, 16, generator=g), torch.randint(0, classes, (bs,), generator=g)) for _ in range(n)]


def test_gradient_score_with_nm_picks_its_entries_among_the_kept_ones():
    """N:M with the gradient score: the base weights are pruned by |W|·‖X‖ (Wanda's N:M criterion; gradients
    never travel down to the nodes), the gradient chooses the trainable entries among the kept ones, and the
    merged weight stays N:M."""
    from timm.models.vision_transformer import VisionTransformer

    def vit():
        torch.manual_seed(0)
        return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=4)

    cfg = TaskEdgeConfig(budget=0.02, score="gradient", nm=(2, 4))
    assert prune_score(cfg) == "taskedge" and prune_score(TaskEdgeConfig(nm=(2, 4))) == "taskedge"
    ref = vit()
    norms, _ = calibrate(ref, TaskEdgeConfig(score="taskedge", nm=(2, 4)), _labelled())
    wanda = score_modules(ref, TaskEdgeConfig(score="taskedge"), norms)
    model, mask = get_taskedge_model(vit(), cfg, _labelled())
    names = nm_names(ref, cfg)
    assert names and mask.norms is not None
    for n in names:
        keep = nm_keep(wanda[n], 2, 4).reshape(-1)
        assert keep[mask.indices[n]].all(), n
    for layer in model.modules():  # trained values: the merged weight keeps the pattern
        if hasattr(layer, "values"):
            with torch.no_grad():
                layer.values.normal_()
    assert check_nm(merge_and_unload(model), 2, 4, names) == {n: 0 for n in names}
    _, paper = get_taskedge_model(vit(), TaskEdgeConfig(budget=0.02, nm=(2, 4)), _labelled())
    assert any(not torch.equal(mask.indices[n], paper.indices[n]) for n in mask.names())  # the labels matter


def test_federated_gradient_nm_prunes_identically_and_keeps_the_pattern(weights, tmp_path):
    cfg = _cfg(weights, tmp_path, nm="2:4", budget=0.02)
    grid = _grid(cfg)
    fed, summary = run_federation(grid, cfg)
    assert summary["rounds"] == 1 and not fed.dropped and fed.mask.norms is not None
    server = method_model(cfg, fed.mask)
    names = nm_names(server_model(cfg), cfg.taskedge_config())
    assert names
    for ctx in grid.contexts.values():  # every node prunes its backbone as the server did
        node = method_model(cfg, Mask.from_arrays({k: v.numpy() for k, v in ctx.state["mask"].items()}))
        for n in names:
            assert torch.equal(node.get_submodule(n).weight, server.get_submodule(n).weight), n
    set_arrays(cfg.method, server, fed.arrays)
    assert check_nm(export(cfg.method, server), 2, 4, names) == {n: 0 for n in names}
