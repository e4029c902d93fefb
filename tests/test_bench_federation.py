"""benchmarks/bench_federation.py's issue-21 protocols (quality under an upload or round budget, cost to
target) on hand-computed curves, its round plan and cost estimate, and its resumable cache."""
from __future__ import annotations

import json

import pytest

from benchmarks.bench_federation import (
    SHORT_ROUNDS, UPLOAD_BUDGETS, append_cache, best_within_rounds, best_within_upload, by_seed, config_id,
    cost_to_target, estimate_run_seconds, mean_sd, protocols, read_cache, round_marks, rounds_by_method, run_jobs,
    run_series, shared_runs, suite_series, suite_value,
)

KB = 1_000


# ------------------------------------------------------------------ one run's curve
def test_best_within_upload_takes_the_best_round_that_fits():
    acc, up = [0.1, 0.5, 0.7], [100 * KB, 200 * KB, 300 * KB]  # 100 kB per round
    assert best_within_upload(acc, up, 250 * KB) == 0.5  # 2 rounds = 200 kB <= 250 kB; round 3 (300 kB) does not fit
    assert best_within_upload(acc, up, 300 * KB) == 0.7  # the budget is inclusive
    assert best_within_upload(acc, up, 1_000 * KB) == 0.7
    assert best_within_upload(acc, up, 99 * KB) is None  # even round 1 costs more
    assert best_within_upload([0.1, 0.6, 0.4], up, 1_000 * KB) == 0.6  # the best round, not the last


def test_best_within_rounds_needs_the_run_to_reach_round_n():
    assert best_within_rounds([0.1, 0.5, 0.7], 2) == 0.5
    assert best_within_rounds([0.1, 0.6, 0.4], 3) == 0.6
    assert best_within_rounds([0.1, 0.5, 0.7], 4) is None  # stopped at round 3: no value for 4 rounds


def test_cost_to_target_is_the_first_round_reaching_it():
    acc, up = [0.1, 0.5, 0.7], [100 * KB, 200 * KB, 300 * KB]
    assert cost_to_target(acc, up, 0.95 * 0.6) == (3, 300 * KB)  # 0.57: round 2's 0.5 is short of it
    assert cost_to_target(acc, up, 0.5) == (2, 200 * KB)  # reaching = >=
    assert cost_to_target([0.6, 0.4, 0.7], up, 0.55) == (1, 100 * KB)  # the first, not the last, crossing
    assert cost_to_target(acc, up, 0.8) is None  # never within the run


def test_run_series_adds_the_setup_upload_and_skips_round_0():
    run = {"setup_upload_bytes_per_client": 60 * KB,
           "history": [{"round": 0, "central_acc": 0.05, "bytes_up_per_client": None}]
           + [{"round": r, "central_acc": a, "bytes_up_per_client": 100 * KB}
              for r, a in ((1, 0.1), (2, 0.5), (3, 0.7))]}
    acc, up = run_series(run)
    assert acc == [0.1, 0.5, 0.7] and up == [160 * KB, 260 * KB, 360 * KB]
    assert best_within_upload(acc, up, 250 * KB) == 0.1  # the 60 kB setup leaves room for one round only
    run["setup_upload_bytes_per_client"] = None  # a method without a statistics phase (or an older cache)
    assert run_series(run)[1] == [100 * KB, 200 * KB, 300 * KB]


def test_mean_sd_over_the_values_that_exist():
    assert mean_sd([0.4, 0.5, None]) == {"mean": 0.45, "sd": pytest.approx(0.0707, abs=1e-4), "seeds": 2}
    assert mean_sd([0.3]) == {"mean": 0.3, "sd": 0.0, "seeds": 1}
    assert mean_sd([None, None]) is None


def test_suite_value_needs_every_task():
    assert suite_value([0.4, 0.6]) == pytest.approx(0.5)
    assert suite_value([0.4, None]) is None  # a task whose round 1 is over budget: no suite mean for that seed


# ------------------------------------------------------------------ suite means over tasks and seeds
def _run(key, task, seed, acc, per_round, setup=None, part="iid"):
    hist = [{"round": 0, "central_acc": 0.0, "bytes_up_per_client": None}]
    hist += [{"round": r, "central_acc": a, "bytes_up_per_client": per_round} for r, a in enumerate(acc, start=1)]
    return {"partition": part, "task": task, "seed": seed, "key": key, "final_acc": acc[-1],
            "setup_upload_bytes_per_client": setup, "history": hist}


CURVES = {  # (key, task, seed) -> accuracy after rounds 1..3
    ("m", "A", 0): [0.1, 0.5, 0.7], ("m", "B", 0): [0.3, 0.3, 0.9],
    ("m", "A", 1): [0.2, 0.4, 0.6], ("m", "B", 1): [0.4, 0.6, 0.8],
    ("fedavg-full", "A", 0): [0.5, 0.78, 0.8], ("fedavg-full", "B", 0): [0.6, 0.7, 0.8],  # targets 0.76, 0.76
    ("fedavg-full", "A", 1): [0.3, 0.5, 0.6], ("fedavg-full", "B", 1): [0.5, 0.9, 0.9],  # targets 0.57, 0.855
}
UPLOAD = {"m": 100 * KB, "fedavg-full": 1_000 * KB}


@pytest.fixture
def results():
    return [_run(k, t, s, acc, UPLOAD[k]) for (k, t, s), acc in CURVES.items()]


def test_protocols_suite_mean_per_seed_then_mean_sd_over_seeds(results):
    p = protocols(results, ["A", "B"], ["m", "fedavg-full"], [1, 3, 4])["iid"]
    m, fa = p["m"], p["fedavg-full"]
    # 0.25 MB = rounds 1-2 of m: seed 0 (0.5 + 0.3) / 2 = 0.4, seed 1 (0.4 + 0.6) / 2 = 0.5
    assert m["best_acc_within_upload"]["0.25MB"] == {"mean": 0.45, "sd": pytest.approx(0.0707, abs=1e-4), "seeds": 2}
    assert m["best_acc_within_upload"]["1MB"]["mean"] == 0.75  # all 3 rounds: (0.8 + 0.7) / 2
    assert fa["best_acc_within_upload"]["0.25MB"] is None  # FedAvg's round 1 alone sends 1 MB
    assert fa["best_acc_within_upload"]["1MB"]["mean"] == 0.475  # round 1: (0.55 + 0.4) / 2
    assert fa["best_acc_within_upload"]["4MB"]["mean"] == 0.775  # (0.8 + 0.75) / 2
    assert m["best_acc_within_rounds"]["1"]["mean"] == 0.25 and m["best_acc_within_rounds"]["3"]["mean"] == 0.75
    assert m["best_acc_within_rounds"]["4"] is None  # 3-round runs
    assert m["budgets_beyond_last_round"] == ["1MB", "4MB"] and fa["budgets_beyond_last_round"] == ["4MB"]
    assert m["rounds"] == 3 and m["seeds"] == 2


def test_protocols_cost_to_95_percent_of_fedavg_final(results):
    p = protocols(results, ["A", "B"], ["m", "fedavg-full"], [3])["iid"]
    m, fa = p["m"]["cost_to_target"], p["fedavg-full"]["cost_to_target"]
    # m: seed 0 A (0.76) never, B (0.76) round 3; seed 1 A (0.57) round 3, B (0.855) never
    assert m["runs"] == 4 and m["never_reached"] == 2
    assert m["upload_bytes_mean"] is None and m["rounds_mean"] is None  # a mean over infinite costs
    assert m["upload_bytes_mean_reached"] == 300 * KB and m["rounds_mean_reached"] == 3
    # FedAvg reaches 95 % of its own final at round 2 in seed 0 A (0.78 >= 0.76) and seed 1 B (0.9 >= 0.855), else 3
    assert fa["never_reached"] == 0 and fa["rounds_mean"] == 2.5 and fa["upload_bytes_mean"] == 2_500 * KB
    assert fa["target"] == "0.95 x fedavg-full final"


def test_protocols_leave_out_a_seed_without_every_task_and_runs_without_a_reference(results):
    results = [r for r in results if not (r["key"] == "m" and r["task"] == "B" and r["seed"] == 1)]
    assert sorted(by_seed(results, "iid", "m", ["A", "B"])) == [0]
    m = protocols(results, ["A", "B"], ["m"], [3])["iid"]["m"]
    assert m["seeds"] == 1 and m["best_acc_within_upload"]["0.25MB"] == {"mean": 0.4, "sd": 0.0, "seeds": 1}
    no_ref = [r for r in results if r["key"] != "fedavg-full"]
    assert protocols(no_ref, ["A", "B"], ["m"], [3])["iid"]["m"]["cost_to_target"]["runs"] == 0


def test_suite_series_sd_over_seeds_and_upload_with_setup():
    runs = [_run("m", "A", s, acc, 100 * KB, setup=50 * KB) for s, acc in ((0, [0.2, 0.4]), (1, [0.4, 0.8]))]
    out = suite_series(by_seed(runs, "iid", "m", ["A"]))
    assert out["cum_upload_per_client_with_setup"] == [50 * KB, 150 * KB, 250 * KB]
    assert out["curve_sd"] == [0.0, pytest.approx(0.1414, abs=1e-4), pytest.approx(0.2828, abs=1e-4)]
    assert out["seeds_in_curve_sd"] == 2


# ------------------------------------------------------------------ plan, estimate, cache
def test_dominated_methods_stop_at_short_rounds():
    keys = ["taskedge-best", "head-only"]
    assert rounds_by_method(keys, 40, ["head-only"]) == {"taskedge-best": 40, "head-only": SHORT_ROUNDS}
    assert rounds_by_method(keys, 2, ["head-only"]) == {"taskedge-best": 2, "head-only": 2}  # --quick
    assert round_marks(40) == [10, 40] and round_marks(2) == [1, 2]
    assert list(UPLOAD_BUDGETS.values()) == [250_000, 1_000_000, 4_000_000]


def _job(key, rounds, method="taskedge", seed=0):
    return {"task": "A", "partition": "iid", "seed": seed, "key": key, "nodes": 5,
            "overrides": {"method": method, "num-server-rounds": rounds}}


def test_estimate_counts_a_shared_run_once_and_uses_stand_ins():
    jobs = [_job("taskedge-paper", 40), _job("taskedge-best", 40),  # the same config: one run
            _job("taskedge-lora", 40, "taskedge-lora"), _job("head-only", 10, "head-only")]
    prof = {"taskedge-best": (2.0, 1.0), "fedlora": (1.0, 0.5)}
    # 2 + 40 x 1 (taskedge, once) + 1 + 40 x 0.5 (taskedge-lora -> fedlora's) + 2 + 10 x 1 (head-only -> TaskEdge's)
    assert estimate_run_seconds(jobs, prof) == 42 + 21 + 12
    assert shared_runs(jobs) == {"taskedge-best": "taskedge-paper"}


def test_cache_survives_a_cut_line_and_serves_every_key_of_a_run(tmp_path):
    cache = tmp_path / "runs.jsonl"
    a, b, c = _job("taskedge-paper", 3), _job("x", 3, seed=1), _job("y", 3, seed=2)
    append_cache(cache, a, {**a, "final_acc": 0.5, "wall_s": 1.0})
    append_cache(cache, b, {**b, "final_acc": 0.6, "wall_s": 1.0})
    with open(cache, "a") as fh:
        fh.write('{"job_id": "cut by an interrup')  # the process died in the middle of a write
    append_cache(cache, c, {**c, "final_acc": 0.7, "wall_s": 1.0})
    done = read_cache(cache)
    assert sorted(r["final_acc"] for r in done.values()) == [0.5, 0.6, 0.7] and config_id(c) in done
    out = run_jobs([_job("taskedge-best", 3), a, c], workers=1, cache=cache)  # all cached: nothing runs
    assert [r["key"] for r in out] == ["taskedge-best", "taskedge-paper", "y"]
    assert [r["final_acc"] for r in out] == [0.5, 0.5, 0.7]
    assert len(cache.read_text().splitlines()) == 4  # nothing appended


def test_quick_protocol_fields_round_trip_as_json(results):
    p = protocols(results, ["A", "B"], ["m", "fedavg-full"], [1, 3])
    assert json.loads(json.dumps(p)) == p  # no inf / NaN: never-reached is null plus a count
