"""One federation run on any Grid, phase by phase: used by the ServerApp and by the in-process tests.

    wait for min-nodes (once) -> [taskedge] statistics phase -> reconcile -> mask delivery
    -> Strategy.start(R rounds) -> [every reconcile-every rounds: statistics -> reconcile -> start]
    -> export the merged model, write the summary

`Strategy.start` drives every training round; its `evaluate_fn` is the one per-round hook,
so it evaluates centrally and hands the result to the recorder, which closes the round.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.export import save_model
from common.local import local_eval
from common.registry import MASK_METHODS
from common.methods import (base_fingerprint, base_model, carry_arrays, export, get_arrays,
                            method_model, num_entries, set_arrays)
from common.models import BACKBONE_KEY
from common.partition import server_test_set
from common.preprocess import resolve_preprocess
from common.settings import AppConfig
from common.taskedge.allocation import Mask

from .checkpoint import Checkpoint, load_checkpoint
from .codec import ValueCodec
from .guard import ReplyGuard
from .messages import array_record, wait_for_nodes
from .phases import MaskDelivery, classes_phase, max_examples, setup_cohort, statistics_phase
from .recorder import RoundLog, RunRecorder, new_run_dir
from .privacy import Privacy, PrivacyBudgetExhausted
from .robust import UpdateClipping
from .strategy import make_strategy, momentum_state, restore_momentum


@dataclass
class Federation:
    """What a run leaves behind (for the ServerApp's log, tests and benchmarks)."""

    cfg: AppConfig
    run_dir: Path | None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    mask: Mask | None = None
    mask_version: int = 0
    history: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    node_rank: dict[int, int] = field(default_factory=dict)


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


class _Nodes:
    """Which nodes a phase goes on with after the start: whoever is connected, if at least max(1, min-replies).

    `min-nodes` is waited for once, before the first phase; a node lost later does not stall the run.
    Each round says once when it goes on with fewer than min-nodes nodes or without a node seen before.
    With fewer than max(1, min-replies) connected it waits up to round-timeout (logging every 30 s), then
    fails with the command that resumes from the last checkpoint.
    """

    def __init__(self, grid: Grid, cfg: AppConfig, log: RoundLog, run_dir: Path | None, nodes: list[int]):
        self.grid, self.cfg, self.log, self.run_dir = grid, cfg, log, run_dir
        self.seen, self.said = set(nodes), set()

    def __call__(self, rnd: int) -> list[int]:
        cfg, need = self.cfg, max(1, self.cfg.min_replies)
        try:
            nodes = wait_for_nodes(self.grid, need, cfg.round_timeout, what="min-replies")
        except TimeoutError as exc:
            ck = self.run_dir / "checkpoint.safetensors" if self.run_dir else None
            src = str(self.run_dir) if ck is not None and ck.is_file() else cfg.resume
            how = (f"resume from the last complete round with: flwr run . <connection> --run-config "
                   f"\"resume='{src}'\" (plus this run's other overrides)") if src else "no round was completed"
            raise RuntimeError(f"round {rnd}: {exc}; {how}") from None
        lost = sorted(self.seen - set(nodes))
        if (len(nodes) < cfg.min_nodes or lost) and rnd not in self.said:
            self.said.add(rnd)
            self.log.info("Round %d: going on with the %d connected node(s)%s (min-nodes=%d is waited for only "
                          "before the first phase; a round needs min-replies=%d valid replies)", rnd, len(nodes),
                          f", without node(s) {', '.join(map(str, lost))}" if lost else "", cfg.min_nodes,
                          cfg.min_replies)
        self.seen.update(nodes)
        return nodes


def _reconcile(grid: Grid, fed: Federation, delivery: MaskDelivery, log: RoundLog, nodes: list[int],
               privacy: Privacy | None = None) -> bool:
    """Statistics phase + new mask; surviving entries keep their learned values. False: skipped."""
    cfg = fed.cfg
    mask = (privacy.statistics_phase(grid, nodes, fed.mask_version) if privacy is not None and privacy.active
            else statistics_phase(grid, cfg, nodes, log))  # secure / DP statistics: server/privacy.py
    if mask is None:
        if fed.mask is None:
            why = "; ".join(d["reason"] for d in log.dropped[-3:])
            raise RuntimeError(f"statistics phase: fewer valid replies than min-replies={cfg.min_replies}"
                               + (f" (e.g. {why})" if why else ""))
        log.info("Re-reconciliation skipped: too few valid statistics replies")
        return False
    arrays = get_arrays(cfg.method, method_model(cfg, mask))
    if fed.mask is not None:
        arrays = carry_arrays(cfg.method, fed.mask, fed.arrays, mask, arrays)
        log.info("Re-reconciled mask v%d: %d entries, %d carried values", fed.mask_version + 1, mask.num_entries,
                 int(np.count_nonzero(next(iter(arrays.values())))))
    fed.mask, fed.mask_version, fed.arrays = mask, fed.mask_version + 1, arrays
    delivery.install(mask, fed.mask_version)
    return True


def run_federation(grid: Grid, cfg: AppConfig, run_dir: str | Path | None = "auto",
                   wrap: Callable[[Strategy], Strategy] | None = None) -> tuple[Federation, dict]:
    """Run `num-server-rounds` rounds (continuing a checkpoint with `resume`) and export the model.

    `wrap` puts a Flower strategy wrapper (e.g. a DP wrapper) around the strategy, inside the reply guard.
    """
    if run_dir == "auto":
        run_dir = new_run_dir(cfg.output_dir, cfg.method)
    fed, log = Federation(cfg, Path(run_dir) if run_dir else None), RoundLog()
    ck = load_checkpoint(cfg.resume) if cfg.resume else None
    if ck is not None and ck.method != cfg.method:
        raise ValueError(f"run config 'resume': checkpoint is for method {ck.method!r}, not {cfg.method!r}")
    nodes = wait_for_nodes(grid, cfg.min_nodes)  # min-nodes: only before the first phase (no time limit)
    # the classes the data names (every later message carries them); a resumed run keeps the checkpoint's
    cohort = setup_cohort(nodes, cfg)  # setup-fraction: the nodes the classes and statistics phases ask
    cfg = fed.cfg = (replace(cfg, **{k.replace("-", "_"): ck.config[k] for k in ("class-names", "num-classes")
                                     if k in ck.config}) if ck is not None else classes_phase(grid, cfg, cohort, log))
    delivery = MaskDelivery(cfg, log) if cfg.method in MASK_METHODS else None
    connected = _Nodes(grid, cfg, log, fed.run_dir, nodes)
    privacy = Privacy(cfg, log, delivery, nodes, fed.run_dir)  # inactive unless secure-aggregation / dp is set
    privacy.plan(cfg.num_server_rounds - (ck.round if ck else 0), int(delivery is not None and ck is None)
                 + (len(range(cfg.reconcile_every, cfg.num_server_rounds, cfg.reconcile_every))
                    if delivery is not None and cfg.reconcile_every else 0))
    if delivery is None:
        fed.arrays = get_arrays(cfg.method, method_model(cfg))
    elif ck is None:
        try:
            _reconcile(grid, fed, delivery, log, cohort, privacy)
        except PrivacyBudgetExhausted as exc:  # not even the statistics release fits max-epsilon
            privacy.stopped = f"stopped before training: {exc}"
            log.info("Privacy budget: %s", privacy.stopped)
            return _stop_before_training(fed, log, privacy)
    else:
        fed.mask, fed.mask_version = ck.mask, ck.mask_version
        delivery.install(ck.mask, ck.mask_version)
    if ck is not None:
        fed.arrays = dict(ck.arrays)
        log.info("Resuming from %s at round %d", cfg.resume, ck.round)
    done = ck.round if ck else 0
    if delivery is not None:
        # the mask phase (also tells each node's budget rank); outside the setup cohort a node gets it when sampled
        delivery.ensure(grid, setup_cohort(connected(done + 1), cfg))
    nested = cfg.method == "taskedge" and (any(r > 0 for r in delivery.ranks.values()) or bool(cfg.budget_ranks)
                                           or (cfg.setup_fraction < 1 and cfg.dp == "none"))  # ranks outside the
    # cohort are learnt when those nodes are first sampled; DP runs keep every node on the full mask (privacy.wrap)
    evaluate = cfg.fraction_evaluate > 0 and not privacy.active
    if cfg.fraction_evaluate > 0 and privacy.active:
        log.info("Federated evaluation is off with %s: each node's loss, accuracy and test-split size would reach "
                 "the server in the clear (fraction-evaluate=%g ignored)",
                 "secure-aggregation" if cfg.secure_aggregation else "dp", cfg.fraction_evaluate)
    strategy = make_strategy(cfg, delivery, nested, evaluate, wrapped=privacy.dp or wrap is not None)
    keys = list(fed.arrays)
    restore_momentum(strategy, ck.opt_state if ck else {}, keys)
    inner = privacy.wrap(strategy, wrap, nested)  # `wrap`, or run config dp's wrapper; privacy bookkeeping
    if privacy.dp and not cfg.secure_aggregation:  # the DP bound and no other: a fixed clip the noise is made for
        inner = UpdateClipping(inner, log, cfg.dp_clip_norm, 0.0, private=True)
    elif (cfg.clip_norm > 0 or cfg.clip_factor > 0) and not cfg.secure_aggregation:  # secure: nodes clip
        inner = UpdateClipping(inner, log, cfg.clip_norm, cfg.clip_factor)
    guard = ReplyGuard(inner, log, cfg.min_replies, max_examples(cfg), delivery.forget if delivery else None,
                       private=privacy.dp, positions=delivery.positions if nested and not cfg.secure_aggregation else None,
                       codec=ValueCodec(cfg.value_dtype, cfg.seed))
    recorder = RunRecorder(fed.run_dir, cfg.to_dict(), log)
    model = method_model(cfg, fed.mask)
    fingerprint = base_fingerprint(cfg.model, cfg.head_size, cfg.weights_path, cfg.seed, cfg.img_size)
    test_set = server_test_set(cfg)
    log.info("Headline accuracy: %s", "the server's test set (%s)" % (cfg.server_data_path or f"task {cfg.task}")
             if test_set is not None else "federated evaluation (the nodes' own test splits; no server test set)")
    first = True

    def end_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's per-round hook: central evaluation, then the recorder closes the round."""
        if server_round == 0 and not first:
            return None  # a later segment's start: the round was closed already
        fed.arrays = _arrays(arrays)
        central = None
        if test_set is not None:
            set_arrays(cfg.method, model, fed.arrays)
            central = local_eval(model, *test_set)
        rnd = done + server_round
        recorder.end_round(rnd, central, Checkpoint(rnd, cfg.method, fed.arrays, fed.mask, fed.mask_version,
                                                    momentum_state(strategy, keys), cfg.to_dict()),
                           trainable_entries=num_entries(fed.arrays), mask_version=fed.mask_version,
                           mask_entries=fed.mask.num_entries if fed.mask else 0)
        if rnd < cfg.num_server_rounds:
            connected(rnd + 1)  # enough nodes for the next round, or fail naming the resume command
        return MetricRecord({"central-acc": central["acc"], "central-loss": central["loss"]}) if central else None

    every = cfg.reconcile_every if delivery is not None else 0
    while done < cfg.num_server_rounds:
        try:  # a statistics release (re-reconciliation) or a training release may meet max-epsilon
            if every and done > 0 and done % every == 0 and not first and _reconcile(
                    grid, fed, delivery, log, setup_cohort(connected(done + 1), cfg, salt=done), privacy):
                model = method_model(cfg, fed.mask)
                restore_momentum(strategy, {}, keys)
            rounds = min(every - done % every if every else cfg.num_server_rounds, cfg.num_server_rounds - done)
            conf = {**cfg.client_config(), "mask-version": fed.mask_version, "round-offset": done,
                    BACKBONE_KEY: fingerprint}  # every method's nodes check it, late joiners too
            guard.start(grid=privacy.grid(grid), initial_arrays=array_record(fed.arrays), num_rounds=rounds,
                        timeout=cfg.round_timeout, train_config=ConfigRecord(dict(conf)),
                        evaluate_config=ConfigRecord(dict(conf)), evaluate_fn=end_round)
        except PrivacyBudgetExhausted as exc:  # max-epsilon: stop before the release, keep what was trained
            privacy.stopped = f"stopped after round {len([r for r in recorder.rounds if 'sent' in r])}: {exc}"
            log.info("Privacy budget: %s", privacy.stopped)
            break
        done, first = done + rounds, False
    fed.history, fed.dropped = recorder.rounds, log.dropped
    fed.node_rank = dict(delivery.ranks) if delivery else {}
    return fed, _finish(fed, recorder, model, privacy.summary())


def _stop_before_training(fed: Federation, log: RoundLog, privacy: Privacy) -> tuple[Federation, dict]:
    """The run ends before any release: the pre-trained model, unchanged, is the final model."""
    cfg = fed.cfg
    recorder = RunRecorder(fed.run_dir, cfg.to_dict(), log)
    base = base_model(cfg.model, cfg.head_size, cfg.weights_path, cfg.seed, cfg.img_size)
    fed.dropped = log.dropped
    return fed, _finish(fed, recorder, base, privacy.summary(), method="head-only")


def _finish(fed: Federation, recorder: RunRecorder, model, extra: dict | None = None,
            method: str | None = None) -> dict:
    """Export the merged model and write the run summary."""
    cfg = fed.cfg
    method = method or cfg.method
    if fed.arrays:
        set_arrays(method, model, fed.arrays)
    summary = summarize(fed.history, cfg.method)
    summary["dropped_replies"] = len(fed.dropped)
    summary.update(extra or {})  # privacy: final (epsilon, delta), secure aggregation, why a run stopped early
    if fed.run_dir is not None:
        save_model(export(method, model).state_dict(), fed.run_dir / "final_model.safetensors", model_name=cfg.model,
                   class_names=cfg.classes, preprocess=resolve_preprocess(cfg.model, cfg.img_size or None),
                   extra={"method": cfg.method, "data": cfg.data_path or f"task {cfg.task}",
                          "rounds": summary.get("rounds", 0)})
        summary["run_dir"] = str(fed.run_dir)
        recorder.summary = summary
        stopped = (extra or {}).get("stopped")
        failing = failed_every_round(fed)
        if failing:
            summary["failed_nodes"] = failing
        recorder.status = (f"stopped: {stopped}" if stopped else
                           f"degraded: {len(failing)} node(s) failed every round ({failing[0]['reason']})"
                           if failing else "complete")
        summary["status"] = recorder.status
        recorder.write()
    return summary


def failed_every_round(fed: Federation) -> list[dict]:
    """Nodes whose replies were dropped in every training round of the run, with their first reason: a run
    in which a node never counted is not `complete` (a missing data-path used to end that way, exit 0)."""
    rounds = {r["round"] for r in fed.history if "sent" in r}
    by_node: dict[int, list[dict]] = {}
    for d in fed.dropped:
        by_node.setdefault(d["node"], []).append(d)
    return [{"node": n, "reason": ds[0]["reason"]} for n, ds in sorted(by_node.items())
            if rounds and rounds <= {d["round"] for d in ds}]


def summarize(history: list[dict], method: str) -> dict:
    """Final accuracy and traffic per client and round over the training rounds."""
    trained = [r for r in history if "sent" in r]
    last = history[-1] if history else {}
    mean = lambda k: float(np.mean([r[k] for r in trained if r.get(k) is not None])) if trained else 0.0  # noqa: E731
    s = {"method": method, "rounds": len(trained), "initial_acc": history[0].get("central_acc") if history else None,
         "final_acc": last.get("central_acc"), "final_fed_acc": last.get("fed_acc"),
         "upload_bytes_per_client_round": mean("bytes_up_per_client"),
         "download_bytes_per_client_round": mean("bytes_down_per_client"),
         "total_bytes": last.get("cum_bytes", 0), "trainable_entries": last.get("trainable_entries"),
         "skipped_rounds": sum(bool(r.get("skipped")) for r in trained)}
    bound = mean("bound_bytes_per_client")
    s["bound_ratio"] = s["upload_bytes_per_client_round"] / bound if bound else None
    # the first statistics query's upload per replying node (with SecAgg+ the whole protocol's), and of that the
    # one-off gradient sums of score='gradient' (None without them): setup costs a benchmark reports beside rounds
    setup = next((r for r in history if r.get("stats_replies")), None)
    s["setup_upload_bytes_per_client"] = setup["stats_bytes_up"] / setup["stats_replies"] if setup else None
    s["grad_upload_bytes_per_client"] = (setup["grad_bytes_up"] / setup["stats_replies"]
                                         if setup and "grad_bytes_up" in setup else None)
    return s
