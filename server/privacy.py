"""Privacy of a run, from its run config: SecAgg+ and central DP for the statistics and training rounds.

* `secure-aggregation=true`: both the statistics round and every training round go through Flower's
  SecAgg+ (`server/secure.py`); the server learns only sums over the nodes that completed it.
* `dp=server|client`: Flower's message-API wrappers around the strategy
  (`DifferentialPrivacyServerSideFixedClipping` / `...ClientSideFixedClipping`, the latter with
  Flower's `fixedclipping_mod` on the nodes; `dp-clipping=adaptive`: server-side adaptive clipping),
  inside the reply guard. Nodes report weight 1 (Flower's accountant needs equal weights).
  The statistics round gets its own Gaussian mechanism: every node's per-column mean-square
  vector is clipped to norm `stats-clip-norm` (on the node with SecAgg+, else on the server) and
  the sum gets N(0, (sigma_s * stats-clip-norm)^2) per entry before the mask is built. With
  score='gradient' the nodes' gradient sums / calib-size are a second vector of the same query,
  clipped on their own to `grad-clip-norm` and noised with N(0, (sigma_s * grad-clip-norm)^2): a
  second Gaussian release (the statistics are then released only when N:M prunes by them).
* Accounting: one Flower `RdpAccountant` (client level, add-or-remove-one, no sampling
  amplification: Flower's fixed-clipping wrappers support only that) holds the statistics release
  (and the gradient release: each its own clip, so two releases of multiplier sigma_s rather than
  one clip of the concatenation) and the training releases (the wrapper composes those itself).
  The round records carry `dp_epsilon` / `dp_delta`; with `max-epsilon` the release that would
  pass it is refused (`PrivacyBudgetExhausted`), and the runner stops there with the model it has.
"""
from __future__ import annotations

import json
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideAdaptiveClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy)
from flwr.supercore import log as flwr_log
from flwr.supercore.differential_privacy import compute_stdv
from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                               SamplingMethod)

from common.taskedge.allocation import Mask
from common.privacy import clip_grads, grad_pooled, grad_shapes, stats_contribution, stats_pooled, stats_shapes
from common.settings import AppConfig
from common.taskedge.scores import get_score
from common.taskedge.stats import sum_stats
from common.taskedge.tuner import target_modules

from . import validate
from .phases import max_examples, send_query, server_model, stats_limits, stats_upload
from .reconcile import stats_mask
from .recorder import RoundLog
from .secure import REQUEST, SecAggSettings, SecureGrid, SecureTraining, secure_sum

STATE_FILE = "privacy.json"


def make_accountant(cfg: AppConfig, population: int):
    """Flower's RDP accountant for this run (None without noise: epsilon is infinite)."""
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant(PrivacyConfig(target_delta=cfg.dp_delta, population_size=population,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION,
                                       max_epsilon=cfg.max_epsilon or None))


def projected_epsilon(noise_multiplier: float, rounds: int, delta: float, stats_noise_multiplier: float = 0.0,
                      stats_releases: int = 1, population: int = 1) -> float:
    """Epsilon at `delta` after `stats_releases` statistics releases and `rounds` training releases."""
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    acc = RdpAccountant(PrivacyConfig(delta, population, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      SamplingMethod.NO_AMPLIFICATION))
    if stats_releases and stats_noise_multiplier > 0:
        acc.compose(GaussianPrivacyEvent(stats_noise_multiplier, 1, population), stats_releases)
    if rounds:
        acc.compose(GaussianPrivacyEvent(noise_multiplier, 1, population), rounds)
    return acc.get_epsilon(delta)


def noise_for_epsilon(epsilon: float, rounds: int, delta: float, stats_releases: int = 1, lo: float = 0.05,
                      hi: float = 500.0) -> float:
    """The noise multiplier (same for statistics and training) that spends `epsilon` over the run."""
    for _ in range(60):  # bisection on a monotone function
        mid = (lo * hi) ** 0.5
        if projected_epsilon(mid, rounds, delta, mid, stats_releases) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


class Privacy:
    """The privacy machinery of one run (inactive with the defaults: every method passes through)."""

    def __init__(self, cfg: AppConfig, log: RoundLog, delivery=None, nodes: list[int] | None = None,
                 run_dir: Path | None = None):
        self.cfg, self.log, self.delivery, self.run_dir = cfg, log, delivery, run_dir
        nodes = list(nodes or [])
        self.dp = cfg.dp != "none"
        self.secure = cfg.secure_aggregation
        self.update_bound = (cfg.dp_clip_norm if self.dp else cfg.clip_norm if cfg.clip_norm > 0
                             else cfg.secagg_clipping_range)
        self.population = max(cfg.num_partitions, len(nodes), 1)
        self.sampled = max(int(len(nodes) * cfg.fraction_train), 1)
        self.stats_sigma = cfg.dp_stats_noise_multiplier or cfg.dp_noise_multiplier
        self.accountant = None
        if self.dp and cfg.dp_clipping == "fixed" and cfg.dp_noise_multiplier > 0 and self.stats_sigma > 0:
            self.accountant = make_accountant(cfg, self.population)
            self._restore()
        self.training = None
        if self.secure:
            settings = SecAggSettings.from_config(cfg, cfg.secagg_clipping_range or self.update_bound)
            self.training = SecureTraining(cfg, log, settings, self.update_bound, max_examples(cfg), delivery)
        self.dp_strategy: Strategy | None = None
        self.pooled: dict[str, np.ndarray] | None = None  # the last pooled statistics (tests, benchmarks)
        self.released: dict[str, np.ndarray] | None = None  # the last DP statistics release (sums + noise)
        self.pooled_grads: dict[str, np.ndarray] | None = None  # the last pooled gradient sums (DP: the release)
        self.stopped = ""

    @property
    def active(self) -> bool:
        return self.dp or self.secure

    # ---------------------------------------------------------------- accounting
    def _restore(self) -> None:
        """Continue the account of the run a `resume` continues; refuse to start it afresh."""
        if not self.cfg.resume:
            return
        src = Path(self.cfg.resume)
        state = (src if src.is_dir() else src.parent) / STATE_FILE
        if not state.is_file():
            raise ValueError(f"run config 'resume': {state} is missing: the privacy spent before the checkpoint is "
                             f"unknown, so a DP run cannot be continued from it")
        self.accountant.load_state_dict(json.loads(state.read_text())["accountant"])

    def spent(self) -> dict[str, Any]:
        if self.accountant is None:
            return {"dp_epsilon": float("inf") if self.dp else None, "dp_delta": self.cfg.dp_delta if self.dp else None}
        s = self.accountant.get_privacy_spent()
        return {"dp_epsilon": s.epsilon, "dp_delta": s.delta, "dp_releases": s.num_releases}

    def record(self) -> None:
        """Put the cumulative (epsilon, delta) into the open round and the run folder."""
        if not self.dp:
            return
        spent = self.spent()
        self.log.set(**spent)
        if self.run_dir is not None and self.accountant is not None:
            (self.run_dir / STATE_FILE).write_text(json.dumps({"accountant": self.accountant.state_dict(),
                                                               **spent}, indent=2))

    def plan(self, rounds: int, stats_releases: int) -> None:
        """Log what the run will spend (and where max-epsilon stops it)."""
        if not self.dp:
            return
        cfg = self.cfg
        if self.accountant is None:
            flwr_log(WARNING, "DP: %s; no (epsilon, delta) is reported", "adaptive clipping is not accounted by "
                     "Flower 1.42" if cfg.dp_clipping == "adaptive" else "zero noise: epsilon is infinite")
            return
        per_phase = sum(self.releases())  # statistics and / or gradient sums, one Gaussian release each
        eps = [projected_epsilon(cfg.dp_noise_multiplier, r, cfg.dp_delta, self.stats_sigma,
                                 stats_releases * per_phase, self.population) for r in range(rounds + 1)]
        flwr_log(INFO, "DP (%s clipping %.3g, noise multiplier %.3g, statistics %.3g x %.3g): epsilon %.3f after "
                 "%d round(s) at delta %g", cfg.dp, cfg.dp_clip_norm, cfg.dp_noise_multiplier, self.stats_sigma,
                 cfg.stats_clip_norm, eps[-1], rounds, cfg.dp_delta)
        if cfg.max_epsilon and eps[-1] > cfg.max_epsilon:
            ok = max([r for r in range(rounds + 1) if eps[r] <= cfg.max_epsilon], default=-1)
            flwr_log(WARNING, "DP: max-epsilon=%g allows %s; the run will stop there", cfg.max_epsilon,
                     f"{ok} training round(s)" if ok >= 0 else "not even the statistics release")

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.dp:
            out.update(dp=self.cfg.dp, **self.spent())
        if self.secure:
            out["secure_aggregation"] = True
        if self.stopped:
            out["stopped"] = self.stopped
        return out

    # ---------------------------------------------------------------- strategy side
    def wrap(self, strategy: Strategy, user_wrap=None, nested: bool = False) -> Strategy:
        """The strategy with the run config's DP wrapper (or the caller's wrap) and the privacy ledger."""
        cfg = self.cfg
        inner = strategy
        if user_wrap is not None:
            if self.dp:
                raise ValueError("run_federation(wrap=...) and run config 'dp' both wrap the strategy; use one")
            inner = user_wrap(strategy)
        elif self.dp:
            if nested:
                raise ValueError("run config 'dp': nested budgets (a node with a smaller budget rank) average each "
                                 "entry over the nodes that trained it, which Flower's DP wrappers neither calibrate "
                                 "noise for nor account; run DP with every node on the full mask")
            acc = self.accountant
            if acc is not None and not (isinstance(strategy, FedAvg)
                                        and type(strategy).aggregate_train is FedAvg.aggregate_train):
                flwr_log(WARNING, "DP: %s overrides FedAvg.aggregate_train; Flower's accountant needs it unchanged, "
                         "so no (epsilon, delta) is reported", type(strategy).__name__)
                acc = self.accountant = None
            args = (strategy, cfg.dp_noise_multiplier, cfg.dp_clip_norm, self.sampled)
            if cfg.dp_clipping == "adaptive":
                inner = DifferentialPrivacyServerSideAdaptiveClipping(strategy, cfg.dp_noise_multiplier, self.sampled,
                                                                      initial_clipping_norm=cfg.dp_clip_norm)
            elif cfg.dp == "server":
                inner = DifferentialPrivacyServerSideFixedClipping(*args, accountant=acc)
            else:
                inner = DifferentialPrivacyClientSideFixedClipping(*args, accountant=acc)
            self.dp_strategy = inner
        return PrivacyLedger(inner, self) if self.active else inner

    def grid(self, grid: Grid) -> Grid:
        """The grid `Strategy.start` sends through: SecAgg+ for training rounds when secure."""
        return SecureGrid(grid, self.training) if self.secure else grid

    # ---------------------------------------------------------------- statistics
    def releases(self) -> tuple[bool, bool]:
        """What a statistics phase releases: (activation statistics, gradient sums). score='gradient' builds
        its mask from the gradient sums, and from the statistics only when N:M prunes by them, so it releases
        (and the accountant charges) only those; every other score releases the statistics."""
        tcfg = self.cfg.taskedge_config()
        spec = get_score(tcfg.score)
        return (not spec.needs_gradients or spec.needs_stats or tcfg.nm is not None), spec.needs_gradients

    def statistics_phase(self, grid: Grid, nodes: list[int], server_round: int = 0) -> Mask | None:
        """The statistics round, securely summed and/or with the Gaussian mechanism; the global mask.

        score='gradient': the nodes' gradient sums travel in the same query, as a second vector with its own
        clip (`grad-clip-norm`, common.privacy `grad_contribution`), its own noise N(0, (sigma_s x bound)^2) and
        its own Gaussian release in the accountant (two releases of multiplier sigma_s when both go out)."""
        cfg, log = self.cfg, self.log
        base, tcfg = server_model(cfg), cfg.taskedge_config()
        targets = target_modules(base, tcfg)
        shapes, rows = stats_limits(base, cfg, targets)
        modules = sorted(shapes)
        max_rows = {m: rows[m] * cfg.calib_size for m in modules}
        bound, gbound, gscale = cfg.stats_clip_norm, cfg.grad_clip_norm, float(cfg.calib_size)
        with_stats, with_grads = self.releases()
        gshapes = {n: (m.weight.shape[0], m.weight[0].numel()) for n, m in targets.items()} if with_grads else None
        releases = int(with_stats) + int(with_grads)
        event = None
        if self.dp and self.accountant is not None:
            event = GaussianPrivacyEvent(self.stats_sigma, len(nodes), self.population)
            if cfg.max_epsilon and self.accountant.would_exceed(event, count=releases):
                raise PrivacyBudgetExhausted(
                    f"the statistics release would push epsilon past max-epsilon={cfg.max_epsilon:g} (spent so far: "
                    f"{self.accountant.get_privacy_spent().epsilon:.4g} at delta {cfg.dp_delta:g})")
        weighted = not self.dp  # DP: every node's contribution bounded, whatever its row count
        from .phases import stats_config  # the client keys + the server's backbone fingerprint

        config = stats_config(cfg)
        grads: list[tuple[dict, bool]] = []  # plain / DP: each node's clipped sums
        gsums: list[np.ndarray] = []  # secure: the summed vectors
        if self.secure:
            req = ConfigRecord({"message-type": "query.stats", "clipping-range": bound, "stats-bound": bound,
                                "weighted": weighted, "modules": modules, "max-rows": [max_rows[m] for m in modules],
                                "with-stats": with_stats, "grad-bound": gbound if with_grads else 0.0,
                                "grad-scale": gscale})
            requests = {n: RecordDict({"config": config, REQUEST: req}) for n in nodes}
            settings = SecAggSettings.from_config(cfg, bound)
            vectors = ((stats_shapes(shapes, modules) if with_stats else [])
                       + (grad_shapes(gshapes, modules) if with_grads else []))
            res = secure_sum(grid, requests, vectors, settings, server_round, cfg.round_timeout)
            for nid, why in res.dropped.items():
                log.drop(nid, f"statistics: {why}")
            log.add(query_bytes_down=res.bytes_down, query_bytes_up=res.bytes_up, stats_bytes_up=res.bytes_up,
                    stats_replies=len(res.active))
            log.set(stats_secagg_time_s=res.seconds, stats_secagg_active=len(res.active),
                    stats_quant_bound=2.0 * bound * len(res.active) / settings.quantization_range)  # per summed entry
            if with_grads:  # the masked gradient vectors (int64 on the wire), and the error of a summed entry
                log.add(grad_bytes_up=sum(res.vector_bytes[-(len(modules) + 1):]))
                log.set(grad_quant_bound=2.0 * gbound * len(res.active) / settings.quantization_range)
            if res.sums is None:
                log.info("Statistics phase: %s", res.reason)
                return None
            split = len(modules) + 2 if with_stats else 0
            sums, gsums, count = res.sums[:split], res.sums[split:], len(res.active)
        else:
            replies = send_query(grid, cfg, log, RecordDict({"config": config}), nodes, "stats")
            log.add(**stats_upload(replies.values(), with_grads))
            stats = []
            for nid in nodes:
                try:
                    if nid not in replies:
                        raise validate.BadReply("no reply before the timeout")
                    st, _, _ = validate.stats_reply(replies[nid], shapes, rows, cfg.calib_size, max_examples(cfg),
                                                    None, gshapes)
                except Exception as exc:  # noqa: BLE001 - one reply never stops the phase
                    log.drop(nid, f"statistics: {exc}")
                    continue
                stats.append(st)
            contributions = ([stats_contribution(st, modules, max_rows, bound, bound, weighted) for st in stats]
                             if with_stats else [])
            sums = [np.sum(parts, axis=0) for parts in zip(*contributions)] if contributions else []
            # the plain phase's clip (server/phases.py), so a run without noise gives the plain mask
            grads = [clip_grads(st, modules, gscale, gbound) for st in stats] if with_grads else []
            count = len(stats)
        log.info("Statistics phase: %d/%d nodes in the %ssum", count, len(nodes), "secure " if self.secure else "")
        if count < cfg.min_replies or count == 0:
            return None
        noise = gnoise = None
        if self.dp:
            sd, gsd = self.stats_sigma * bound, self.stats_sigma * gbound
            if with_stats:
                noise = [np.random.normal(0.0, sd, shapes[m]) for m in modules] if sd > 0 else None
                # the release itself (what the mask is built from, before the clamp at 0)
                self.released = {m: sums[i] + (noise[i] if noise is not None else 0.0) for i, m in enumerate(modules)}
                log.set(dp_stats_noise_std=sd, dp_stats_clip_norm=bound)
            if with_grads:  # in the units of grad_contribution (sums / calib-size), sensitivity grad-clip-norm
                gnoise = [np.random.normal(0.0, gsd, gshapes[m]) for m in modules] if gsd > 0 else None
                log.set(dp_grad_noise_std=gsd, dp_grad_clip_norm=gbound)
            if event is not None:
                self.accountant.compose(event, releases)
            self.record()
        pooled: dict[str, np.ndarray] = {}
        log.set(stats_nodes=count)
        if with_stats:
            self.pooled, info = stats_pooled(sums, modules, max_rows, bound, weighted, noise)
            pooled.update(self.pooled)
            if not self.dp:  # DP: no un-noised count
                log.set(stats_clipped=info["clipped"])
        if with_grads:
            if self.secure:
                summed, gclipped = grad_pooled(gsums, modules, gscale, gbound, bound, gnoise)
            else:
                summed, gclipped = sum_stats([g for g, _ in grads]), sum(c for _, c in grads)
                if gnoise is not None:
                    summed = {f"{m}.g": summed[f"{m}.g"] + gnoise[i] * gscale for i, m in enumerate(modules)}
            self.pooled_grads = summed
            pooled.update(summed)
            if not self.dp:
                log.set(grad_clipped=gclipped)
        return stats_mask(base, tcfg, [pooled], "sum")


class PrivacyLedger(Strategy):
    """Innermost-but-one wrapper (inside the reply guard): books what the privacy layer did each round.

    With SecAgg+ it replaces the reply guard's byte counts of the (synthetic) aggregate replies by the
    bytes the protocol really moved; with DP it records the noise and the cumulative (epsilon, delta)."""

    def __init__(self, strategy: Strategy, privacy: Privacy):
        self.strategy, self.privacy = strategy, privacy

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        cfg, log = self.privacy.cfg, self.privacy.log
        if self.privacy.dp:
            config["uniform-weights"] = True
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        if self.privacy.dp:
            dp = self.privacy.dp_strategy
            clip = float(getattr(dp, "clipping_norm", cfg.dp_clip_norm))
            log.set(dp_clip_norm=clip, dp_noise_std=compute_stdv(cfg.dp_noise_multiplier, clip, self.privacy.sampled))
        return messages

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        training = self.privacy.training
        if training is not None and training.last is not None:
            last = training.last
            self.privacy.log.set(bytes_up=last.bytes_up,
                                 bytes_up_per_client=last.bytes_up / max(len(last.active), 1),
                                 bytes_down=last.bytes_down)
        result = self.strategy.aggregate_train(server_round, replies)
        self.privacy.record()
        return result

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


__all__ = ["Privacy", "PrivacyLedger", "PrivacyBudgetExhausted", "noise_for_epsilon", "projected_epsilon",
           "make_accountant"]
