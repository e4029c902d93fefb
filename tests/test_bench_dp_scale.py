"""benchmarks/bench_dp_scale.py: the larger training split it gives the simulated nodes, and its --quick run
(6 clients, 1 round, 1 seed) end to end: the epsilon the server's accountant reports is the target, the noise
on the mean is sigma * C / n, every client is sampled, and the files it writes hold what it printed."""
import json

import pytest


def test_training_split_is_larger_inside_and_restored_after():
    from common.data.splits import make_split
    import common.partition as P
    from benchmarks.bench_dp_scale import partition_sizes, prepare_partitions, training_split

    before = P.partition_tensors
    with training_split(6 * 32):
        sizes = partition_sizes("shapes-downstream", 6, 0.5, 0)
        x, y = P.make_split("shapes-downstream", "train")
        assert len(x) == len(y) == 6 * 32 == sum(sizes) and min(sizes) >= 10  # the partitioner's own floor
        assert len(P.make_split("shapes-downstream", "test", n=50)[0]) == 50  # other splits pass through
        # the larger split starts with the built-in split (one seeded stream): the same examples, more of them
        x0, y0 = make_split("shapes-downstream", "train", n=100)
        assert bool((x[:100] == x0).all()) and bool((y[:100] == y0).all())
        assert prepare_partitions("shapes-downstream", 6, 0.5, 0) == sizes
        hits = P.partition_tensors.cache_info().hits
        local = P.load_local_data("shapes-downstream", 5, 6, test_fraction=0.0, calib_size=16)
        assert len(local.x_train) == sizes[5] and P.partition_tensors.cache_info().hits == hits + 1  # prepared
    assert P.make_split is make_split and P.partition_tensors is before
    assert P.partitioned.cache_info().currsize == 0  # nothing of the larger split stays cached


@pytest.mark.slow
def test_bench_dp_scale_quick(weights, tmp_path):
    from benchmarks.bench_dp_scale import main
    from server.privacy import noise_for_epsilon

    doc = main(["--quick", "--weights", weights, "--out", str(tmp_path)])
    args = doc["args"]
    assert (args["clients"], args["rounds"], args["seeds"], args["epsilons"]) == ([6], 1, [0], [8.0, 2.0])
    runs = {r["config"]: r for r in doc["runs"]}
    assert set(runs) == {"non-private", "eps=8", "eps=2"} and len(doc["runs"]) == 3
    for name, eps in (("eps=8", 8.0), ("eps=2", 2.0)):
        r = runs[name]
        sigma = noise_for_epsilon(eps, 1, 1e-5, stats_releases=1)
        assert r["target_epsilon"] == eps
        assert abs(r["epsilon"] - eps) <= 1e-6  # the server's accountant, statistics release + 1 round
        assert r["noise_multiplier"] == pytest.approx(sigma, rel=1e-12)
        assert r["noise_sd_on_mean"] == pytest.approx(sigma * args["clip"] / 6, rel=1e-9)
    assert runs["eps=2"]["noise_multiplier"] > runs["eps=8"]["noise_multiplier"] > 0
    np_run = runs["non-private"]
    assert np_run["epsilon"] is None and np_run["noise_multiplier"] == 0.0 and np_run["noise_sd_on_mean"] == 0.0
    for r in doc["runs"]:
        assert r["sampled_per_round"] == [6] and r["replies_per_round"] == [6] and r["rounds_done"] == 1
        assert len(r["acc_by_round"]) == 2 and r["acc_by_round"][-1] == r["final_acc"]
        correct = r["final_acc"] * args["test_size"]
        assert correct == pytest.approx(round(correct), abs=1e-6)  # a whole count of the 200 test examples
        assert 0 < r["peak_rss_mb"] <= doc["process_peak_rss_mb"] + 1 and r["wall_s"] > 0
    by = {a["config"]: a for a in doc["summary"]}
    for name in ("eps=8", "eps=2"):
        assert by[name]["gap_pts_mean"] == pytest.approx(100 * (np_run["final_acc"] - runs[name]["final_acc"]))
    assert set(doc["clients_needed"]) == {"eps=8", "eps=2"}
    cal = doc["calibration"]
    assert cal["clients"] == 6 and len(cal["rounds"]) == 1 and cal["update_entries"] > 0
    assert 0 < cal["rounds"][0]["alignment"] <= 1 + 1e-9 and cal["rounds"][0]["median_norm"] > 0
    # the files hold the same run
    saved = json.loads((tmp_path / "bench_dp_scale_quick.json").read_text())
    assert [r["final_acc"] for r in saved["runs"]] == [r["final_acc"] for r in doc["runs"]]
    md = (tmp_path / "bench_dp_scale_quick.md").read_text()
    assert "| 6 | eps=8 | 8.0000 |" in md and "| 6 | non-private | inf |" in md
    assert (tmp_path / "bench_dp_scale_quick.png").read_bytes()[:4] == b"\x89PNG"
