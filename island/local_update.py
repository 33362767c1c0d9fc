"""The drop-in training-loop API for local-update mode (DiLoCo / CO2), around the user's loop.

Usage (the daemon is built from the same pieces)::

    engine = SyncEngine(SyncConfig(model_id="lm", every=100), identity, "aggregator:7400")
    with LocalUpdate(model, inner_optimizer, engine=engine) as lu:
        for batch in data:
            loss = model(batch); loss.backward()
            inner_optimizer.step(); inner_optimizer.zero_grad()
            lu.step()   # once per inner step, after optimizer.step()
    engine.close()

A **round** is ``every`` (``H``) inner steps from the anchor ``theta_b`` (global version
``b``), or, with ``every_s`` (``T``), as many inner steps as the island computes in ``T``
seconds: the round ends at the first ``step()`` after which the time spent computing since
the round began reaches ``T``. That time is what ``step(seconds=...)`` reports, else the
wall time between one ``step()`` returning and the next call (so the boundaries themselves,
adoption and sync-mode waits are not counted). A slow island then does fewer inner steps per
round and pushes as often as a fast one (the Dynamic Local Updates of Asynchronous
Local-SGD, Liu et al. 2024, arXiv:2401.09135, with the clock setting each island's steps).
At the round boundary (DiLoCo, Douillard et al. 2023, Algorithm 1; CO2, Sun et al.,
ICLR 2024, for the overlap):

1. ``delta = start - params`` (float32), the progress of this round only, is handed to the
   engine, which compresses, signs and pushes it in the background, tagged with
   ``base_version = b``;
2. *then* the anchor adopts every global version received so far, in order:
   ``anchor_v = anchor_{v-1} + u_v`` (float32, sorted-name order: bit-identical with the root;
   with ``adopt = "arrival"``, the default, versions are also adopted mid-round, below);
3. the next round starts from ``start = anchor - sum(own deltas no version holds yet)``
   (``rebase = "eager"``, the default) or from ``anchor`` alone (``"reset"``). Either way the
   local parameters are overwritten: the pushed delta carries this round's progress, and
   keeping them would count it twice. The inner optimizer's state (AdamW moments) is kept.

Why eager: with overlap, the version that merges this round's delta arrives during the next
round, so a reset start lacks the island's own last round and the root applies a delta
computed one version back; with Nesterov's momentum 0.9 that delay makes DiLoCo's outer loop
oscillate. Applying its own in-flight delta locally (undamped; the merged one replaces it as
soon as a version lists it among its ``contributors``) starts each round where the global
model is heading, in the spirit of CO2's overlap (Sun et al. 2024) and of eager updates for
overlapped DiLoCo (Kale et al. 2025).

With ``adopt = "arrival"`` (the default; overlapped mode) an island does not wait for the boundary to
adopt a version: at the first ``step()`` after one arrives it moves the anchor and shifts the
parameters by ``new start - old start``. The round's progress ``params - start``, the delta it
will push, is unchanged; only its base moves to the newer version (whose number the push
then carries as ``base_version``). A round thus runs on a stale start only for the few inner
steps until the version merging the previous round arrives, as in Streaming DiLoCo's overlap
of ``tau`` inner steps (Douillard et al. 2025), instead of for the whole round.

So every inner step reaches the global model exactly once: through this round's delta, which
the root merges into a later version that this island adopts at a later boundary. In
``overlapped`` mode a boundary never waits for the network (except to recover from lost
versions, by downloading a snapshot); in ``sync`` mode (synchronous DiLoCo, for comparison)
it waits, after pushing, for a version newer than ``b``.

Call-order rules: enter the context (or call ``start()``) before training: a late joiner
with no anchor downloads the newest snapshot and loads it into the model here. Call
``step()`` exactly once per inner step, after ``optimizer.step()`` (with gradient
accumulation: once per optimizer step, not per micro-batch). At a boundary ``step()``
overwrites the parameters in place: the Parameter objects stay the same, so the optimizer
and any references to them remain valid. A normal exit ends a partial round like a boundary
(``flush_on_exit``); an exit by exception does not. The engine belongs to the caller, who
closes it after the context exits.

Concurrency: one thread (the training loop); the network runs on the engine's loop thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from comms.errors import NotFoundError
from comms.update import Manifest
from island.lookahead import NesterovReplay
from island.pseudo import (
    add_numpy_into,
    apply_version,
    check_same_layout,
    copy_arrays,
    load_numpy_into,
    params_to_numpy,
    pseudo_gradient,
)
from island.sync import PushOutcome, SnapshotRefusedError, SyncEngine, VersionGapError
from island.sync.auto import plan_round, push_nbytes

log = logging.getLogger(__name__)


class _Unresolved:
    """The future of a delta pushed before a restart: outcome unknown, treated as pending."""

    @staticmethod
    def done() -> bool:
        return False


_PENDING = _Unresolved()


def model_manifest(model: torch.nn.Module) -> Manifest:
    """The names and shapes of ``model``'s parameters as the island syncs them (float32)."""
    return Manifest(
        tuple((n, tuple(int(d) for d in p.shape), "float32") for n, p in model.named_parameters())
    )


class LocalUpdate:
    """Wraps a training loop into local-update rounds; see the module docstring.

    ``anchor`` and ``anchor_version`` resume from a known global version (a restart from a
    snapshot): the model is left as it is. Without them the newest snapshot is downloaded
    when the context is entered. ``every`` overrides the engine's round size (``sync.every``
    or ``sync.every_s``) with rounds of that many inner steps.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer | None = None,
        every: int | None = None,
        *,
        engine: SyncEngine,
        anchor: Mapping[str, Any] | None = None,
        anchor_version: int | None = None,
        flush_on_exit: bool = True,
        first_every: int | None = None,
    ):
        if (anchor is None) != (anchor_version is None):
            raise ValueError("give both anchor and anchor_version (a resume), or neither")
        self.model = model
        self.inner_optimizer = inner_optimizer  # kept as is across rounds, as in DiLoCo
        self.engine = engine
        # rounds of every inner steps, or (every None) of every_s seconds of compute
        self.every_s = engine.config.every_s if every is None else None
        self.every = engine.config.every if every is None else int(every)
        if self.every_s is None and not (self.every is not None and self.every >= 1):
            raise ValueError(f"every must be >= 1 inner step, got {every}")
        # the first round's length in inner steps (a staggered start, island.streaming)
        if first_every is not None and not (self.every_s is None and first_every >= 1):
            raise ValueError(f"first_every must be >= 1 inner step with every, got {first_every}")
        self.first_every = first_every
        self._floor = (self.every, self.every_s)  # auto never goes below the configured round
        self._auto_sizes: dict[str, int] | None = None  # auto: codec -> bytes of one push
        self._auto_choice: tuple | None = None  # auto: the last plan's (codec, every, every_s)
        self.sync_mode = engine.config.mode == "sync"
        self.flush_on_exit = flush_on_exit
        self._anchor: dict[str, np.ndarray] | None = None
        self._start: dict[str, np.ndarray] | None = None  # where the current round began
        self._in_flight: dict[int, dict[str, np.ndarray]] = {}  # own deltas no version holds
        self._in_flight_futures: dict[int, Any] = {}
        cfg = engine.config
        self.eager = cfg.rebase in ("eager", "lookahead")  # own in-flight deltas are tracked
        self.lookahead = (
            NesterovReplay(cfg.outer_lr, cfg.outer_momentum) if cfg.rebase == "lookahead" else None
        )
        # adopt versions mid-round (overlapped only; sync mode adopts at the boundary anyway)
        self.adopt_on_arrival = cfg.adopt == "arrival" and not self.sync_mode
        self.start_serial = 0  # changes whenever the round's start point does
        self._version = -1
        self._resume = (anchor_version, anchor) if anchor is not None else None
        self._round = 0
        self._steps_in_round = 0
        self._tokens_in_round = 0
        self._compute_in_round = 0.0  # seconds of compute in this round (every_s)
        self._step_returned: float | None = None  # when step() last returned
        self._total_steps = 0
        self._boundary_s = 0.0
        self._started_at: float | None = None
        self.last_push: Any = None  # future of the last round's PushOutcome
        # () -> a small dict of figures (loss, steps/s, ...) sent as the push meta's "report";
        # aggregators show it on their dashboard (aggregator.dashboard) and drop a bad one
        self.report: Callable[[], dict[str, Any]] | None = None

    # ------------------------------------------------------------------ lifetime

    def start(self) -> LocalUpdate:
        """Set the anchor: from ``anchor`` (resume) or the aggregator's snapshot (late join)."""
        if self._anchor is not None:
            return self
        self._started_at = time.perf_counter()
        # every version and snapshot must be this model's (names, shapes; float32 on the wire)
        self.engine.expect_manifest(model_manifest(self.model))
        if self._resume is not None:
            version, anchor = self._resume
            self._anchor = copy_arrays(anchor)
            self._version = int(version)
            check_same_layout(dict(self.model.named_parameters()), self._anchor, "resume anchor")
            if self.engine.newest_version() is None:
                self.engine.follow(self._version)
            self._start = params_to_numpy(self.model)  # a resumed round start (see state_dict)
        else:
            self._version, params = self.engine.fetch_snapshot()
            self._anchor = copy_arrays(params)
            self._start = copy_arrays(self._anchor)
            load_numpy_into(self.model, self._anchor)
        log.info("model %s: training from global version %d", self.engine.model_id, self._version)
        self._step_returned = time.perf_counter()
        return self

    def __enter__(self) -> LocalUpdate:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.flush_on_exit and self._steps_in_round:
            self.end_round()

    # ------------------------------------------------------------------ the loop

    def step(self, tokens: int = 0, seconds: float | None = None) -> bool:
        """Count one inner step; at the end of a round (the ``every``-th step, or ``every_s``
        seconds of compute), push, adopt and reset. ``tokens``: samples or tokens this step
        consumed, summed into the delta's meta (aggregators may weight updates by it).
        ``seconds``: how long this step computed (``every_s`` only; default: the wall time
        since the last ``step()`` returned). Returns True when a round ended.
        """
        if self._anchor is None:
            raise RuntimeError("call lu.step() inside `with LocalUpdate(...)` or after start()")
        now = time.perf_counter()
        if seconds is None:
            seconds = now - (self._step_returned if self._step_returned is not None else now)
        self._compute_in_round += max(0.0, float(seconds))
        self._steps_in_round += 1
        self._tokens_in_round += int(tokens)
        self._total_steps += 1
        try:
            if self._round_is_done():
                self.end_round()
                return True
            if self.adopt_on_arrival:
                newest = self.engine.newest_version()
                if newest is not None and newest > self._version:
                    self._adopt_mid_round()
            return False
        finally:
            self._step_returned = time.perf_counter()

    def _round_is_done(self) -> bool:
        if self.every_s is not None:
            return self._compute_in_round >= self.every_s
        if self._round == 0 and self.first_every is not None:
            return self._steps_in_round >= self.first_every
        return self._steps_in_round >= self.every

    def end_round(self) -> None:
        """Push this round's delta, adopt the newest global version, reset params to it.

        Called by ``step()`` at each boundary; call it directly to end a round early.
        """
        if self._anchor is None:
            raise RuntimeError("end_round() before start()")
        start = time.perf_counter()
        delta = pseudo_gradient(self._start, params_to_numpy(self.model))
        meta = {
            "steps": self._steps_in_round,
            "tokens": self._tokens_in_round,
            "round": self._round,
        }
        if self.every_s is None:
            meta["every"] = self.every  # the root counts a short round as steps / every of one
        else:  # no "every": the root counts the round as one whole round of work
            meta["compute_s"] = round(self._compute_in_round, 6)
            if not self._tokens_in_round:  # weight_by_samples then weighs by steps
                meta["tokens"] = self._steps_in_round
        if self.report is not None:
            meta["report"] = self.report()
        self.last_push = self.engine.submit_delta(delta, base_version=self._version, meta=meta)
        if self.engine.config.auto and self._steps_in_round:
            self._plan_next_round(delta, self._compute_in_round / self._steps_in_round)
        if self.eager:
            seq = self.last_push.sequence
            self._in_flight[seq], self._in_flight_futures[seq] = delta, self.last_push
        if self.sync_mode:
            self.engine.wait_for_version(self._version, self.engine.config.sync_timeout_s)
        self._adopt()
        load_numpy_into(self.model, self._start)
        self._round += 1
        self._steps_in_round = self._tokens_in_round = 0
        self._compute_in_round = 0.0
        self._boundary_s += time.perf_counter() - start

    def _plan_next_round(self, delta: Mapping[str, np.ndarray], step_s: float) -> None:
        """``sync.auto``: the next round's codec and length from the measured uplink and step
        time (:func:`island.sync.auto.plan_round`); nothing changes before a push has been
        delivered (no rate measured yet) or when a step took no measurable time."""
        rate = self.engine.uplink_bps
        if rate is None or not step_s > 0:
            return
        cfg = self.engine.config
        if self._auto_sizes is None:
            numels = [int(np.asarray(x).size) for x in delta.values()]
            self._auto_sizes = {c: push_nbytes(c, numels) for c in cfg.auto_codecs}
        every, every_s = self._floor
        plan = plan_round(self._auto_sizes, rate, step_s, every=every, every_s=every_s,
                          target=cfg.auto_target, max_factor=cfg.auto_max_factor)  # fmt: skip
        changed = (plan.codec, plan.every, plan.every_s) != self._auto_choice
        self._auto_choice = (plan.codec, plan.every, plan.every_s)
        self.every, self.every_s = plan.every, plan.every_s
        self.engine.set_codec(plan.codec)
        self.engine.set_round_plan({**plan.as_dict(), "uplink_bps": round(rate)})
        if changed:
            log.info(
                "model %s: uplink %.3g Mbit/s, inner step %.3g s: next rounds %s with %s "
                "(push %.2f s, round %.2f s: %s)",
                self.engine.model_id, rate / 1e6, step_s,
                f"{plan.every} steps" if plan.every is not None else f"{plan.every_s:.3g} s",
                plan.codec, plan.push_s, plan.round_s, plan.reason,
            )  # fmt: skip

    def catch_up(self) -> int:
        """Adopt the versions received so far without pushing (e.g. to read the final global
        model after training). Only between rounds: with steps taken since the last boundary
        their progress would be lost, so that raises RuntimeError (call ``end_round()``).
        Returns the new version."""
        if self._anchor is None:
            raise RuntimeError("catch_up() before start()")
        if self._steps_in_round:
            raise RuntimeError(
                f"catch_up() with {self._steps_in_round} steps not pushed; call end_round() first"
            )
        self._adopt()
        load_numpy_into(self.model, self._start)
        return self._version

    def drain(self, timeout_s: float) -> bool:
        """After the last round: adopt versions until a version holds every own delta still in
        flight (or it was refused), for at most ``timeout_s``; True when none is left. Then
        the anchor is the model as the tree holds it with all of this island's progress
        (``rebase = "eager"``; with ``"reset"`` nothing is tracked and it returns at once)."""
        from island.sync import SyncTimeoutError

        deadline = time.monotonic() + timeout_s
        while self._in_flight:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self.engine.wait_for_version(self._version, left)
            except SyncTimeoutError:
                return False
            self.catch_up()
        return True

    def _adopt_mid_round(self) -> None:
        """``adopt = "arrival"``: adopt the versions received so far and shift the params by
        ``new start - old start``, so ``params - start`` (this round's progress, the delta it
        will push) is unchanged while its base moves to the newer version."""
        old = self._start
        self._adopt()
        add_numpy_into(self.model, {n: self._start[n] - old[n] for n in old})

    def _adopt(self) -> None:
        """Move the anchor to the newest version received and the round's start with it (the
        caller moves the params: load the start, or shift them by the start's change)."""
        try:
            versions = self.engine.take_versions(after=self._version)
        except VersionGapError as err:
            log.warning("model %s: %s", self.engine.model_id, err)
            try:  # one try per boundary: training goes on meanwhile
                version, params = self.engine.fetch_snapshot(retry_refused=False)
            except (SnapshotRefusedError, NotFoundError) as err:
                if isinstance(err, SnapshotRefusedError):
                    log.error(
                        "%s; keeping version %d, trying again at the next boundary",
                        err, self._version,
                    )  # fmt: skip
                else:  # the line is not served (now): not fatal either
                    log.warning(
                        "model %s: the aggregator at %s serves neither the versions after %d "
                        "nor a snapshot (%s); keeping version %d and the local model, training "
                        "on and trying again at the next boundary",
                        self.engine.model_id, self.engine.address, self._version, err,
                        self._version,
                    )  # fmt: skip
                self.engine.follow(self._version)
                self._set_start()
                return
            if version >= self._version:
                self._anchor, self._version = copy_arrays(params), version
            else:  # an older snapshot than our anchor: keep ours, follow from it
                self.engine.follow(self._version)
            self._in_flight.clear()  # which of ours the snapshot holds is unknown
            self._in_flight_futures.clear()
            if self.lookahead is not None:
                self.lookahead.reset()
        else:
            for version, u in versions:
                apply_version(self._anchor, u)
                self._version = version
                if self.lookahead is not None:
                    self.lookahead.observe(u, self.engine.step_fraction(version))
        self._set_start()

    def _set_start(self) -> None:
        """start = anchor - the own deltas no adopted version holds yet (eager), or anchor."""
        merged = self.engine.merged_sequences() if self.eager else None
        for seq in list(self._in_flight):
            future = self._in_flight_futures[seq]
            refused = future.done() and future.result().status not in ("accepted", "replayed")
            if merged is None or seq in merged or refused:  # in the global model, or never will be
                del self._in_flight[seq], self._in_flight_futures[seq]
        if self.lookahead is not None:
            start = self.lookahead.predict(self._anchor, self._in_flight.values())
        else:
            start = copy_arrays(self._anchor)
            for delta in self._in_flight.values():
                for name, d in delta.items():
                    np.subtract(start[name], d, out=start[name])
        self._start = start
        self.start_serial += 1

    # ------------------------------------------------------------------ introspection

    @property
    def version(self) -> int:
        """The global version of the current anchor."""
        return self._version

    @property
    def steps_in_round(self) -> int:
        """Inner steps of the current round not pushed yet."""
        return self._steps_in_round

    @property
    def round(self) -> int:
        """Rounds completed so far."""
        return self._round

    @property
    def start_point(self) -> dict[str, np.ndarray]:
        """Where the current round began (the anchor plus own in-flight deltas, when eager)."""
        if self._start is None:
            raise RuntimeError("no start point before start()")
        return self._start

    def state_dict(self) -> dict[str, Any]:
        """The own deltas still in flight (by sequence), for a snapshot taken at a boundary."""
        return {"in_flight": {str(k): v for k, v in self._in_flight.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` after ``start()`` on a resume: their futures are gone, so
        they leave when a version lists them (or at the next snapshot download)."""
        for k, v in state.get("in_flight", {}).items():
            self._in_flight[int(k)] = {n: np.asarray(a, dtype=np.float32) for n, a in v.items()}
            self._in_flight_futures[int(k)] = _PENDING

    def round_state(self) -> dict[str, Any]:
        """The round in progress: where it started, its steps, tokens and compute seconds, and
        the rounds done. For a snapshot taken mid-round (a streamed fragment's, at another
        fragment's boundary: ``island.streaming``); ``load_round_state`` restores it."""
        return {
            "start": self.start_point,
            "steps": self._steps_in_round,
            "tokens": self._tokens_in_round,
            "compute_s": self._compute_in_round,
            "round": self._round,
        }

    def load_round_state(self, state: Mapping[str, Any]) -> None:
        """Restore ``round_state()`` after ``start()`` on a resume: the round goes on from its
        own start, so the steps it took before the snapshot are pushed with it."""
        start = {n: np.array(a, dtype=np.float32) for n, a in state["start"].items()}
        check_same_layout(dict(self.model.named_parameters()), start, "resumed round start")
        self._start = start
        self._steps_in_round = int(state["steps"])
        self._tokens_in_round = int(state["tokens"])
        self._compute_in_round = float(state["compute_s"])
        self._round = int(state["round"])
        self.start_serial += 1

    @property
    def anchor(self) -> dict[str, np.ndarray]:
        """The anchor's float32 arrays (read only: the engine's replica of ``theta_version``)."""
        if self._anchor is None:
            raise RuntimeError("no anchor before start()")
        return self._anchor

    @property
    def stats(self) -> dict[str, Any]:
        """Rounds, steps, version and timings, plus the engine's counters under ``sync``.

        ``blocked_s`` is time the training thread waited on the network (snapshot downloads,
        sync-mode waits); ``compute_fraction`` is the rest of the time since ``start()``, as
        a fraction: the compute utilization that overlap is meant to keep near 1.
        """
        sync = self.engine.stats
        elapsed = 0.0 if self._started_at is None else time.perf_counter() - self._started_at
        blocked = sync["blocked_s"]
        return {
            "rounds": self._round,
            "steps": self._total_steps,
            "steps_in_round": self._steps_in_round,
            "compute_s_in_round": self._compute_in_round,
            "version": self._version,
            "boundary_s": self._boundary_s,
            "blocked_s": blocked,
            "elapsed_s": elapsed,
            "compute_fraction": max(0.0, 1.0 - blocked / elapsed) if elapsed > 0 else 1.0,
            "sync": sync,
        }

    def last_outcome(self, timeout: float | None = None) -> PushOutcome | None:
        """Wait for and return the last push's outcome (None if nothing was pushed yet)."""
        return None if self.last_push is None else self.last_push.result(timeout)
