"""What one aggregator knows of the federation below it, for its dashboard and its parent.

Every aggregator keeps a :class:`FederationView`: a record per island that pushed to it
(from the pushes themselves: when, how many bytes, base version, staleness, inner steps; and
from the island's ``report`` in the push meta: steps per second, utilization, losses), the
recent rejections with their reasons, the times of its versions, and the last summary each
child aggregator reported (with the time it arrived: its freshness). ``summary()`` is what
it reports to its own parent on a timer (:mod:`aggregator.dashboard.summaries`; never inside
a partial, so never in a WAL): its own record, its children's and all their islands,
flattened (so the depth of the tree does not deepen the summary), so the root's view holds
the whole tree. Times travel as ages (``age_s``, seconds before the summary left), never as clock
readings, so a skewed clock elsewhere does not move them; the receiver adds the time the
summary has waited since. ``snapshot()`` is the dashboard's data.

Bytes against data-parallel training: a synchronous data-parallel run with a ring all-reduce
of fp32 gradients moves ``2 (N - 1) / N * 4 * P`` bytes per worker per step (``N`` workers,
``P`` parameters; Patarasuk & Yuan 2009), the figure ``scripts/federation_report.py`` uses;
the dashboard multiplies it by the inner steps each island reports and compares the sum with
the bytes the islands really pushed (measured at their aggregators) and received (as they
report).

Runs on the aggregator's event loop; nothing here blocks or raises on a peer's bad input
(:mod:`aggregator.dashboard.reports` checks it; a bad report is logged, counted and dropped).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from typing import Any

from aggregator.dashboard.reports import (
    MAX_AGGREGATORS,
    MAX_ISLANDS,
    MAX_POINTS,
    MAX_REASONS,
    MAX_REJECTIONS,
    REPORT_FIELDS,
    island_report,
    text,
)
from comms.envelope import parse_header
from comms.errors import MalformedError

log = logging.getLogger("aggregator.service")

ALIVE_MIN_S = 30.0  # an island is alive if it pushed within this...
ALIVE_INTERVALS = 3.0  # ...or within this many of its own mean intervals between pushes
KEEP_REJECTIONS = 64
KEEP_VERSIONS = 1024  # (time, version) pairs per model
KEEP_LOSS_POINTS = 2000
LOSS_FIELDS = ("step", "train_loss", "val_loss", "val_version")


def ddp_bytes_per_step(params: int, islands: int) -> float:
    """Bytes one worker sends per step in a ring all-reduce of fp32 gradients."""
    return 2.0 * (islands - 1) / islands * 4.0 * params if islands > 0 else 0.0


class FederationView:
    """One aggregator's view of the federation below it (see the module docstring)."""

    def __init__(self, name: str, role: str, roster=None, clock=time.time):
        self.name, self.role, self.roster, self.clock = name, role, roster, clock
        self.started = clock()
        self.islands: dict[str, dict[str, Any]] = {}  # "model_id/peer" -> record
        self.children: dict[str, tuple[float, dict]] = {}  # peer -> (received at, summary)
        self.rejections: deque[dict] = deque(maxlen=KEEP_REJECTIONS)
        self.versions: dict[str, deque[tuple[float, int]]] = {}
        self.loss: deque[dict] = deque(maxlen=KEEP_LOSS_POINTS)
        self._loss_steps: dict[str, int] = {}  # island key -> newest step with a point
        self.bad_reports = 0

    # ------------------------------------------------------------------ events

    def admitted(self, admitted, nbytes: int) -> None:
        """A push passed admission: an island's delta updates its record. (A child's
        partial carries no summary: summaries come by ``reported``.)"""
        h = admitted.envelope.header
        if h.kind == "partial":
            return
        try:
            self._island_push(admitted, nbytes)
        except MalformedError as e:
            self.bad_reports += 1
            log.warning("%s: dashboard report of %s dropped (the update is kept): %s",
                        self.name, self._name_of(h.sender), e)  # fmt: skip
        except Exception:  # the dashboard must never fail a push that is already logged
            self.bad_reports += 1
            log.exception("%s: dashboard report of %s dropped", self.name, h.sender)

    def reported(self, sender: str, summary: dict) -> None:
        """A child's checked summary (``aggregator.dashboard.summaries``) replaces its last."""
        self._child(sender, summary)

    def report_refused(self, data: bytes, error: Exception) -> None:
        """A child's summary was refused: counted, and listed with the rejections."""
        self.bad_reports += 1
        self._rejection(data, error)

    def _rejection(self, data: bytes, error: Exception) -> tuple[str, str, str, float]:
        """Append a refusal to the recent rejections; (sender, model id, reason, time)."""
        sender = model_id = ""
        try:
            h = parse_header(data)
            sender, model_id = str(h.sender)[:64], str(h.model_id)[:64]
        except Exception:  # an unreadable header: the rejection is still shown
            pass
        reason = str(getattr(error, "reason", type(error).__name__))[:64]
        now = self.clock()
        self.rejections.append({
            "t": now, "at": self.name, "sender": self._name_of(sender) if sender else "?",
            "model_id": model_id, "reason": reason, "message": str(error)[:200],
        })  # fmt: skip
        return sender, model_id, reason, now

    def rejected(self, data: bytes, error: Exception) -> None:
        """A push was refused: remember when, whose (as its header claims), and why."""
        sender, model_id, reason, now = self._rejection(data, error)
        entry = self.roster.get(sender) if self.roster is not None and sender else None
        known = entry is not None and entry.role != "aggregator"  # islands only: not a child
        room = f"{model_id}/{sender}" in self.islands or len(self.islands) < MAX_ISLANDS
        if known and room:  # a roster member's refusal counts on its record (bounded)
            rec = self._island_record(model_id, sender, now)
            if reason in rec["rejected"] or len(rec["rejected"]) < MAX_REASONS:
                rec["rejected"][reason] = rec["rejected"].get(reason, 0) + 1

    def versioned(self, model_id: str, version: int) -> None:
        """A version was published (root) or followed (leaf, mid)."""
        times = self.versions.setdefault(model_id, deque(maxlen=KEEP_VERSIONS))
        times.append((self.clock(), int(version)))

    # ------------------------------------------------------------------ islands and children

    def _name_of(self, peer: str) -> str:
        entry = self.roster.get(peer) if self.roster is not None and peer else None
        return (entry.name if entry is not None and entry.name else peer[:12]) or "?"

    def _island_record(self, model_id: str, peer: str, now: float) -> dict[str, Any]:
        key = f"{model_id}/{peer}"
        rec = self.islands.get(key)
        if rec is None:
            rec = self.islands[key] = {
                "name": self._name_of(peer), "peer": peer[:64], "leaf": self.name,
                "model_id": model_id[:64], "first_seen": now, "last_seen": None,
                "pushes": 0, "bytes_up": 0, "steps_pushed": 0, "rejected": {},
                "points": deque(maxlen=MAX_POINTS),  # its latest losses, for the parent
            }  # fmt: skip
        return rec

    def _island_push(self, admitted, nbytes: int) -> None:
        h = admitted.envelope.header
        now = self.clock()
        report = island_report(h.meta)  # raises before anything is changed
        rec = self._island_record(h.model_id, h.sender, now)
        rec["last_seen"] = now
        rec["pushes"] += 1
        rec["bytes_up"] += int(nbytes)
        steps = h.meta.get("steps")
        if isinstance(steps, int) and not isinstance(steps, bool) and 0 < steps < 2**31:
            rec["steps_pushed"] += steps
        rec["base_version"], rec["staleness"] = h.base_version, admitted.staleness
        rec.update(report)
        point = {k: report[k] for k in LOSS_FIELDS if k in report}
        if "step" in point and len(point) > 1:  # kept until the next summaries carry it
            rec["points"].append({**point, "t": now})
            self._note_loss(f"{h.model_id}/{h.sender}", rec["name"], point, now)

    def _child(self, sender: str, checked: dict) -> None:
        for rec in checked["aggregators"]:
            if rec["peer"] == sender:  # who feeds whom: the child's parent is this aggregator
                rec["parent"] = self.name
        now = self.clock()
        self.children[sender] = (now, checked)
        for rec in checked["islands"]:
            key = f"{rec.get('model_id', '')}/{rec.get('peer', rec['name'])}"
            for point in sorted(rec["points"], key=lambda p: p["step"]):
                self._note_loss(key, rec["name"], point, now - point["age_s"])

    def _note_loss(self, key: str, island: str, point: dict, t: float) -> None:
        """A point of the loss history, once per island and step (steps only move forward)."""
        step = point.get("step")
        if step is None or step <= self._loss_steps.get(key, -1):
            return
        self._loss_steps[key] = step
        out = {"t": t, "island": island, "step": step}
        out.update({k: point[k] for k in LOSS_FIELDS[1:] if point.get(k) is not None})
        self.loss.append(out)

    # ------------------------------------------------------------------ the views

    def _versions_per_min(self, now: float) -> float:
        recent = sum(1 for times in self.versions.values() for t, _ in times if t > now - 60)
        return float(recent) * 60.0 / max(5.0, min(60.0, now - self.started))

    def _own_record(self, service, now: float) -> dict[str, Any]:
        lines = list(service.lines.values())
        wal_bytes = 0
        for line in lines:
            with contextlib.suppress(OSError):
                wal_bytes += sum(p.stat().st_size for p in line.wal._segments())
        return {
            "name": text(self.name, "name"), "role": self.role,
            "peer": service.identity.peer_id, "address": text(service.address or "", "address"),
            "age_s": 0.0, "uptime_s": round(now - self.started, 1),
            "version": max((line.version for line in lines), default=0),
            "buffered": sum(line.buffered for line in lines), "outbox": service._outbox.qsize(),
            "workers": sum(line.pool.stats().workers_alive for line in lines if line.pool),
            "wal_bytes": wal_bytes,
            "wal_records": sum(max(0, line.wal.last_index - line.wal.mark) for line in lines),
            "versions_per_min": round(self._versions_per_min(now), 2),
            "children": len(service.children),
            "partials_sent": sum(line.partial_seq for line in lines),
        }  # fmt: skip

    def _merged(self, service, now: float) -> dict[str, list]:
        """Own record and islands, and every child's, with ages as of ``now``."""
        aggregators = [self._own_record(service, now)]
        islands: dict[str, dict] = {}
        for key, rec in self.islands.items():
            seen = rec["last_seen"]
            if seen is None:  # known only from rejections
                seen = rec["first_seen"]
            out = {k: v for k, v in rec.items() if k not in ("first_seen", "last_seen")}
            out["age_s"] = round(max(0.0, now - seen), 3)
            out["points"] = [
                {
                    **{k: v for k, v in p.items() if k != "t"},
                    "age_s": round(max(0.0, now - p["t"]), 3),
                }
                for p in rec["points"]
            ]
            if rec["pushes"] > 1 and rec["last_seen"] is not None:
                out["interval_s"] = round((seen - rec["first_seen"]) / (rec["pushes"] - 1), 3)
            islands[key] = out
        rejections = [
            {**{k: v for k, v in r.items() if k != "t"}, "age_s": round(max(0.0, now - r["t"]), 3)}
            for r in self.rejections
        ]
        for received, summary in self.children.values():
            waited = max(0.0, now - received)
            for rec in summary["aggregators"]:
                aggregators.append({**rec, "age_s": rec.get("age_s", 0.0) + waited})
            for rec in summary["islands"]:
                key = f"{rec.get('model_id', '')}/{rec.get('peer', rec['name'])}"
                aged = {**rec, "age_s": rec["age_s"] + waited}
                aged["points"] = [{**p, "age_s": p["age_s"] + waited} for p in rec["points"]]
                if key not in islands or aged["age_s"] < islands[key]["age_s"]:
                    islands[key] = aged  # an island that moved: its newest record
            for rec in summary["rejections"]:
                rejections.append({**rec, "age_s": rec.get("age_s", 0.0) + waited})
        rejections.sort(key=lambda r: r["age_s"])
        return {
            "aggregators": aggregators[:MAX_AGGREGATORS],
            "islands": sorted(islands.values(), key=lambda r: r["age_s"])[:MAX_ISLANDS],
            "rejections": rejections,
        }

    def summary(self, service) -> dict[str, list]:
        """What this aggregator reports to its parent (``aggregator.dashboard.summaries``)."""
        try:
            merged = self._merged(service, self.clock())
        except Exception:  # never hold a partial back for the dashboard's sake
            log.exception("%s: no dashboard summary for the parent this time", self.name)
            return {}
        merged["rejections"] = merged["rejections"][:MAX_REJECTIONS]
        return merged

    def snapshot(self, service) -> dict[str, Any]:
        """The dashboard's data: this aggregator and everything below it."""
        now = self.clock()
        merged = self._merged(service, now)
        for rec in merged["islands"]:
            window = max(ALIVE_MIN_S, ALIVE_INTERVALS * rec.get("interval_s", 0.0))
            rec["alive"] = rec["age_s"] < window
            rec.pop("points", None)  # in the loss history already
        watch = getattr(service, "router_watch", None)
        router = watch.snapshot() if watch is not None else None
        models = self._models(service, merged["islands"], router, now)
        return {
            "at": now,
            "name": self.name,
            "role": self.role,
            "versions_per_min": merged["aggregators"][0]["versions_per_min"],
            "models": models,
            "aggregators": merged["aggregators"],
            "islands": merged["islands"],
            "rejections": merged["rejections"][:KEEP_REJECTIONS],
            "loss": list(self.loss)[-600:],
            "bytes": self._bytes(merged["islands"], models),
            "bad_reports": self.bad_reports,
            "router": router,
            "report_fields": sorted(REPORT_FIELDS),
        }

    def _models(self, service, islands: list[dict], router: dict | None, now: float) -> list:
        """Every model line (each a model id: the global model, or an expert's), with the
        islands that push to it, its pace, and its cluster where known: the router's, else the
        one its islands report (an expert group's); the router's version of it."""
        experts = {e["id"]: e for e in (router or {}).get("experts", ())}
        models = []
        for model_id, line in service.lines.items():
            params = (
                sum(math.prod(shape) for _, shape, _ in line.manifest.tensors)
                if line.manifest is not None
                else 0
            )
            times = list(self.versions.get(model_id, ()))
            mine = [r for r in islands if r.get("model_id") == model_id]
            recent = sum(1 for t, _ in times if t > now - 60)
            expert = experts.get(model_id)
            clusters = sorted({r["cluster"] for r in mine if r.get("cluster") is not None})
            models.append({
                "model_id": model_id, "version": line.version, "params": params,
                "versions": [[round(t, 3), v] for t, v in times[-240:]],
                "versions_per_min": round(
                    recent * 60.0 / max(5.0, min(60.0, now - self.started)), 2),
                "last_version_age_s": round(now - times[-1][0], 3) if times else None,
                "islands": len(mine), "alive": sum(1 for r in mine if r["alive"]),
                "expert": expert is not None or bool(clusters),
                # the router's word, else what its islands report (one cluster per expert)
                "cluster": expert.get("cluster") if expert else (clusters[0] if clusters else None),
                "router_version": expert.get("version") if expert else None,
            })  # fmt: skip
        return models

    @staticmethod
    def _bytes(islands: list[dict], models: list[dict]) -> dict[str, Any]:
        """Bytes the islands moved against a data-parallel run's (module docstring)."""
        params = {m["model_id"]: m["params"] for m in models}
        up = sum(r.get("bytes_up", 0) for r in islands)
        down = sum(r.get("bytes_down", 0) for r in islands)
        ddp = 0.0
        for model_id, p in params.items():
            mine = [r for r in islands if r.get("model_id") == model_id]
            for r in mine:
                steps = r.get("step", r.get("steps_pushed", 0))
                ddp += steps * ddp_bytes_per_step(p, len(mine))
        return {
            "up": up,
            "down": down,
            "ddp": round(ddp),
            "how": "data-parallel: a ring all-reduce of fp32 gradients every inner step, "
            "2 (N-1)/N x 4 x params bytes per island per step, times the steps each island "
            "reports; up: push bytes measured at the aggregators; down: bytes the islands "
            "report receiving",
        }
