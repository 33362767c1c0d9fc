"""``EnsembleModel``: experts trained in isolation, mixed by a router under an ensemble rule.

- flow (Decentralized Diffusion Models; McAllister et al. 2025, eq. 5): the ensemble velocity
  ``v(x_t, t) = sum_k w_k(x_t, t) v_k(x_t, t)`` with ``w`` the router's ``p(k | x_t, t)`` after
  the rule (``full`` is exact; ``top1`` is the paper's best). ``sample`` integrates it with the
  workload's Euler sampler, so the router and the rule are applied again at every step: top-1
  is re-chosen per step and per image.
- bytelm (c-BTM; Gururangan et al. 2023, eq. 2): ``p(x_i | x_<i) = sum_k w_k(x_<i) p_k(x_i |
  x_<i)``, mixed in log space (logsumexp of ``log w_k + log p_k``), with weights from the
  router on the prefix, so generation re-routes at every byte. ``sequence_loss`` scores a batch
  of windows with the weights of each position's own prefix.

Only the experts some row keeps run (``Selection.experts_to_run``), and each runs on just the
rows (images, contexts or windows) that keep it. ``expert_calls`` counts expert forwards and
``calls_by_expert`` splits them by id, so the cost of a rule is observable: with top-1 a
sampling step calls at most as many experts as there are distinct argmaxes in the batch.

Experts are held in an ``nn.ModuleDict`` by id, in router-output order: expert ``i`` of the
dict is output ``i`` of the router. ``add_expert`` / ``remove_expert`` resize the router's head
and keep the surviving experts' rows, so only the router needs retraining.

Synchronous; one forward at a time (the counters are plain integers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from island.workloads.bytelm import TextBatch, sample_byte
from island.workloads.flow import sample as flow_sample
from router.rules import EnsembleRule, Selection, mix_log_probabilities, mix_velocities, parse_rule

__all__ = ["WORKLOAD_ROUTER_METHODS", "EnsembleModel"]

# What a router must offer for each workload.
WORKLOAD_ROUTER_METHODS = {
    "flow": ("probabilities",),
    "bytelm": ("prefix_probabilities", "next_probabilities"),
}


def _check_expert_id(expert_id: Any) -> str:
    if not isinstance(expert_id, str) or not expert_id or "." in expert_id:
        raise ValueError(f"expert id must be a non-empty string without '.', got {expert_id!r}")
    return expert_id


class EnsembleModel(nn.Module):
    """Experts, a router and a rule; see the module docstring for the mixtures."""

    def __init__(
        self,
        workload_name: str,
        experts: Mapping[str, nn.Module],
        router: nn.Module,
        rule: EnsembleRule | str = "top1",
        meta: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        super().__init__()
        if workload_name not in WORKLOAD_ROUTER_METHODS:
            raise ValueError(
                f"no ensemble for workload {workload_name!r}; known: "
                f"{', '.join(WORKLOAD_ROUTER_METHODS)}"
            )
        missing = [m for m in WORKLOAD_ROUTER_METHODS[workload_name] if not hasattr(router, m)]
        if missing:
            raise TypeError(
                f"{type(router).__name__} cannot route {workload_name} inputs: it lacks "
                f"{', '.join(missing)} (use FlowRouter for flow, PrefixRouter or CbtmRouter "
                "for bytelm)"
            )
        if not experts:
            raise ValueError("an ensemble needs at least one expert")
        if router.num_experts != len(experts):
            raise ValueError(
                f"the router has {router.num_experts} outputs but {len(experts)} experts were "
                "given; resize the router head or pass the matching experts"
            )
        self.workload_name = workload_name
        self.experts = nn.ModuleDict({_check_expert_id(k): m for k, m in experts.items()})
        self.router = router
        self.rule = parse_rule(rule) if isinstance(rule, str) else rule
        self.meta: dict[str, dict[str, Any]] = {k: dict((meta or {}).get(k, {})) for k in experts}
        self.reset_counters()

    @classmethod
    def from_parts(
        cls,
        workload_name: str,
        experts: Mapping[str, nn.Module],
        router: nn.Module,
        rule: EnsembleRule | str = "top1",
        meta: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> EnsembleModel:
        """Assemble an ensemble from built experts (dict order = router output order)."""
        return cls(workload_name, experts, router, rule, meta)

    # --- bookkeeping ----------------------------------------------------------------------

    @property
    def expert_ids(self) -> list[str]:
        return list(self.experts.keys())

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def reset_counters(self) -> None:
        self.expert_calls = 0
        self.calls_by_expert: dict[str, int] = dict.fromkeys(self.experts, 0)

    def add_expert(
        self,
        expert_id: str,
        model: nn.Module,
        meta: Mapping[str, Any] | None = None,
        **head_init: Any,
    ) -> None:
        """Append an expert as router output K; ``head_init`` goes to ``router.resize_head``
        (``new_centroids`` for a ``CbtmRouter``). Retrain the router afterwards."""
        expert_id = _check_expert_id(expert_id)
        if expert_id in self.experts:
            raise ValueError(f"expert {expert_id!r} is already in the ensemble")
        k = self.num_experts
        self.router.resize_head(k + 1, list(range(k)), **head_init)
        self.experts[expert_id] = model
        self.meta[expert_id] = dict(meta or {})
        self.calls_by_expert[expert_id] = 0

    def remove_expert(self, expert_id: str) -> None:
        """Drop an expert and its router output; the others keep their logits."""
        if expert_id not in self.experts:
            raise KeyError(f"no expert {expert_id!r}; the ensemble has {self.expert_ids}")
        if self.num_experts == 1:
            raise ValueError("cannot remove the last expert of an ensemble")
        index = self.expert_ids.index(expert_id)
        keep = [i for i in range(self.num_experts) if i != index]
        self.router.resize_head(self.num_experts - 1, keep)
        del self.experts[expert_id]
        self.meta.pop(expert_id, None)
        self.calls_by_expert.pop(expert_id, None)

    def _run_selected(
        self, row_mask: torch.Tensor, run: list[int], forward: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        """Call ``forward(expert, rows)`` for each expert in ``run`` on the rows whose
        ``row_mask[:, k]`` is set (``rows`` None means all); zero-fill the other rows.
        Returns (E, B, ...)."""
        outputs = []
        batch = row_mask.shape[0]
        for k in run:
            expert_id = self.expert_ids[k]
            rows = row_mask[:, k].nonzero().flatten()
            if len(rows) == batch:
                out = forward(self.experts[expert_id], None)
            else:
                part = forward(self.experts[expert_id], rows)
                out = part.new_zeros((batch, *part.shape[1:])).index_copy(0, rows, part)
            self.expert_calls += 1
            self.calls_by_expert[expert_id] = self.calls_by_expert.get(expert_id, 0) + 1
            outputs.append(out)
        return torch.stack(outputs)

    def _select(self, weights: torch.Tensor) -> Selection:
        return self.rule.select(weights.float())

    def _require(self, workload_name: str, what: str) -> None:
        if self.workload_name != workload_name:
            raise TypeError(
                f"{what} is for {workload_name} ensembles; this one is {self.workload_name}"
            )

    # --- flow -----------------------------------------------------------------------------

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``sum_k w_k v_k(x_t, t)`` over the experts the rule keeps: (B, 64), (B,) -> (B, 64)."""
        self._require("flow", "velocity")
        t = t.reshape(-1).expand(x_t.shape[0])
        weights = self.router.probabilities(x_t, t).to(x_t.device)  # (B, K)
        selection = self._select(weights)
        run = selection.experts_to_run()
        mask = selection.mask.to(x_t.device)

        def forward(expert, rows):
            return expert(x_t, t) if rows is None else expert(x_t[rows], t[rows])

        velocities = self._run_selected(mask, run, forward)  # (E, B, ...)
        return mix_velocities(selection.weights.to(x_t.device), velocities, run).to(x_t.dtype)

    @torch.no_grad()
    def sample(self, n: int, steps: int = 50, seed: int = 0):
        """``n`` images (n, 8, 8) from the workload's Euler sampler with the ensemble velocity
        (router and rule re-applied at every step)."""
        self._require("flow", "sample")
        was_training = self.training
        self.eval()
        try:
            return flow_sample(self.velocity, n, steps, seed, device=self._device())
        finally:
            self.train(was_training)

    # --- bytelm ---------------------------------------------------------------------------

    def _expert_window(self, expert: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return idx[:, -getattr(expert, "context", idx.shape[1]) :]

    def next_byte_log_probs(self, context: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the byte after ``context``: (T,) -> (256,), (B, T) -> (B, 256).
        Router weights come from the prefix; each expert sees its last ``context`` bytes."""
        self._require("bytelm", "next_byte_log_probs")
        single = context.dim() == 1
        idx = (context.unsqueeze(0) if single else context).to(self._device(), torch.long)
        if idx.shape[1] == 0:
            raise ValueError("context is empty; give at least one byte (e.g. b'\\n')")
        weights = self.router.next_probabilities(idx).to(idx.device)  # (B, K)
        selection = self._select(weights)
        run = selection.experts_to_run()

        def forward(expert, rows):
            window = self._expert_window(expert, idx if rows is None else idx[rows])
            return torch.log_softmax(expert(window)[:, -1].float(), dim=-1)

        log_probs = self._run_selected(selection.mask.to(idx.device), run, forward)
        mixed = mix_log_probabilities(selection.weights.to(idx.device), log_probs, run)
        return mixed[0] if single else mixed

    def log_probs(self, idx: torch.Tensor) -> torch.Tensor:
        """Per-position mixture: (B, T) bytes -> (B, T, 256) log ``p(x_{i+1} | x_<=i)``, each
        position weighted by the router on its own prefix within the window."""
        self._require("bytelm", "log_probs")
        idx = idx.to(self._device(), torch.long)
        batch, length = idx.shape
        too_long = [k for k, m in self.experts.items() if getattr(m, "context", length) < length]
        if too_long:
            raise ValueError(
                f"windows of {length} bytes exceed the context of experts {too_long}; "
                "use windows no longer than the smallest expert context"
            )
        weights = self.router.prefix_probabilities(idx).to(idx.device)  # (B, T, K)
        selection = self._select(weights.reshape(batch * length, -1))
        run = selection.experts_to_run()
        window_mask = selection.mask.reshape(batch, length, -1).any(dim=1).to(idx.device)

        def forward(expert, rows):
            return torch.log_softmax(expert(idx if rows is None else idx[rows]).float(), dim=-1)

        per_window = self._run_selected(window_mask, run, forward)  # (E, B, T, 256)
        flat = per_window.reshape(len(run), batch * length, -1)
        mixed = mix_log_probabilities(selection.weights.to(idx.device), flat, run)
        return mixed.reshape(batch, length, -1)

    def sequence_loss(self, batch: TextBatch) -> torch.Tensor:
        """Mean negative log-likelihood (nats per byte) of the ensemble on a batch of windows."""
        log_probs = self.log_probs(batch.inputs)  # (B, T, 256)
        targets = batch.targets.to(log_probs.device, torch.long)
        return -log_probs.gather(-1, targets.unsqueeze(-1)).mean()

    @torch.no_grad()
    def generate(
        self,
        prompt: bytes,
        max_new: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> bytes:
        """``max_new`` bytes continuing ``prompt`` (empty starts from a newline), re-routed at
        every byte; deterministic given ``seed``; train/eval mode restored afterwards."""
        self._require("bytelm", "generate")
        was_training = self.training
        self.eval()
        generator = torch.Generator().manual_seed(seed)
        start = prompt or b"\n"
        out = bytearray(start)
        window = self._generation_window()
        try:
            for _ in range(max_new):
                recent = out if window is None else out[-window:]
                ctx = torch.frombuffer(bytearray(recent), dtype=torch.uint8)
                log_probs = self.next_byte_log_probs(ctx).float().cpu()
                out.append(sample_byte(log_probs, temperature, top_p, generator))
        finally:
            self.train(was_training)
        return bytes(out[len(start) :])

    def _generation_window(self) -> int | None:
        """Bytes of history anything looks at: None when the router reads the whole prefix."""
        router_context = getattr(self.router, "context", None)
        if router_context is None:
            return None
        contexts = [getattr(m, "context", None) for m in self.experts.values()]
        if None in contexts:
            return None
        return max([router_context, *contexts])

    # --- nn.Module ------------------------------------------------------------------------

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """flow: ``velocity(x_t, t)``; bytelm: ``log_probs(idx)``."""
        if self.workload_name == "flow":
            return self.velocity(*inputs)
        return self.log_probs(*inputs)

    def _device(self) -> torch.device:
        first = next(iter(self.experts.values()))
        param = next(iter(first.parameters()), None)
        return param.device if param is not None else torch.device("cpu")
