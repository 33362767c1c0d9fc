"""Dashboard summaries up the tree: their own channel, on a timer, never in the WAL.

A leaf or mid sends its parent a summary (:meth:`FederationView.summary
<aggregator.dashboard.view.FederationView.summary>`: its own record, its islands', its
children's, its last rejections) every ``summary_interval_s`` through the transport's
``Report`` call, whether or not it has a partial to send, so an idle leaf's islands stay on
the root's page with their ages growing. The summary travels as an envelope of kind
``summary`` (no tensors, the summary in ``meta``) signed by the aggregator's roster key, like
a partial; its sequence is the send time in milliseconds, so it only grows, also across
restarts.

The parent checks it like a push, in order: size (``MAX_SUMMARY_BYTES``, before parsing),
framing, kind, signature by a roster key in the role ``aggregator``, a sequence above the
sender's last one, then every field (:func:`aggregator.dashboard.reports.child_summary`). A
refusal is a typed error (``OversizeError``, ``MalformedError``, ``SignatureError``,
``UnknownPeerError``, ``ReplayError``) answered with its gRPC status, logged and shown among
the page's rejections; nothing else changes and the service carries on. An admitted summary
replaces the sender's previous one in memory (with the time it arrived: its freshness) and
is never written anywhere: telemetry stays out of the durable path. A restarted parent knows
nothing until each child's next summary.

A child whose sends fail (a parent down, or one that predates ``Report``) logs it once per
kind of failure and keeps training; the next summary goes at the next tick.

Runs on the aggregator's event loop; parsing and the signature check run in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aggregator.dashboard.reports import child_summary
from comms.envelope import Envelope
from comms.errors import CommsError, MalformedError, OversizeError, RejectedError, ReplayError
from comms.transport import DEFAULT_MAX_REPORT_BYTES

log = logging.getLogger("aggregator.service")

MAX_SUMMARY_BYTES = DEFAULT_MAX_REPORT_BYTES  # one summary envelope, both ends
SUMMARY_MODEL_ID = "*"  # a summary concerns the whole aggregator, not one model line


def summary_envelope(identity, summary: dict, sequence: int) -> bytes:
    """The signed ``summary`` envelope of ``summary``, cut to fit ``MAX_SUMMARY_BYTES``:
    islands first (the most recently seen kept), then rejections."""
    summary = dict(summary)
    while True:
        env = Envelope.build(
            model_id=SUMMARY_MODEL_ID, kind="summary", sender=identity.peer_id,
            sequence=sequence, tensors=[], meta={"summary": summary},
        ).sign(identity)  # fmt: skip
        data = env.to_bytes()
        if len(data) <= MAX_SUMMARY_BYTES:
            return data
        for key in ("islands", "rejections", "aggregators"):
            if len(summary.get(key, ())) > 1:
                summary[key] = summary[key][: len(summary[key]) // 2]
                break
        else:
            raise OversizeError(f"a summary of {len(data)} bytes cannot be cut to fit")


def checked_summary(data: bytes, roster) -> tuple[str, int, dict]:
    """``(sender, sequence, summary)`` of a ``Report``'s bytes, every check but the replay
    guard's; raises the typed error of the first check that fails."""
    env = Envelope.from_bytes(data, max_bytes=MAX_SUMMARY_BYTES)
    h = env.header
    if h.kind != "summary" or h.tensors:
        raise MalformedError(f"a report must be a summary with no tensors, got a {h.kind}")
    env.verify(roster, roles=("aggregator",))
    return h.sender, h.sequence, child_summary(h.meta.get("summary"))


class SummaryChannel:
    """The summary side of :class:`~aggregator.service.AggregatorService`: ``on_report``
    (every role) and ``_send_summaries`` (leaf and mid). Uses the service's ``config``,
    ``identity``, ``roster``, ``view`` and ``parent``."""

    _summary_sequences: dict[str, int]

    async def on_report(self, data: bytes) -> dict[str, str]:
        """A child's summary (transport ``Report``): check it, keep it in memory, ack."""
        try:
            sender, sequence, summary = await asyncio.to_thread(checked_summary, data, self.roster)
            last = self._summary_sequences.get(sender, -1)
            if sequence <= last:
                raise ReplayError(f"summary {sequence} from {sender[:12]} is not after {last}")
        except RejectedError as e:
            self.view.report_refused(data, e)
            log.info("%s: refused a summary: %s (%s)", self.config.name, e, e.reason)
            raise
        self._summary_sequences[sender] = sequence
        self.view.reported(sender, summary)
        return {"status": "kept"}

    async def _send_summaries(self) -> None:
        """Every ``summary_interval_s``: this aggregator's summary to its parent, once."""
        interval = self.config.summary_interval_s
        sequence, failing = 0, None
        while True:
            try:
                sequence = max(sequence + 1, int(time.time() * 1000))
                summary = self.view.summary(self)
                data = await asyncio.to_thread(summary_envelope, self.identity, summary, sequence)
                await self.parent.report(data, retries=0)
                if failing is not None:
                    log.info("%s: summaries reach the parent again", self.config.name)
                    failing = None
            except asyncio.CancelledError:
                raise
            except (CommsError, OSError) as e:
                kind = getattr(e, "reason", type(e).__name__)
                if kind != failing:  # once per kind of failure, not at every tick
                    log.warning("%s: dashboard summary not delivered to the parent (%s): %s",
                                self.config.name, kind, e)  # fmt: skip
                    failing = kind
            except Exception:  # the dashboard must never stop this aggregator
                log.exception("%s: dashboard summary failed", self.config.name)
            await asyncio.sleep(interval)
