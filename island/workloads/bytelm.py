"""``bytelm``: a byte-level GPT trained on text files (default: the Python standard library).

The model is a pre-LayerNorm decoder-only transformer in the GPT-2 mould (Radford et al.
2019): vocabulary of the 256 byte values, learned position embeddings, causal self-attention
through ``torch.nn.functional.scaled_dot_product_attention``, a 4x GELU MLP, and the output
projection tied to the token embedding (Press & Wolf 2017). The default (d_model 128, 4
layers, 4 heads, context 128) has about 0.8 M parameters and trains on one CPU core.

A training batch is ``batch_size`` random windows of ``context + 1`` bytes from the shard's
documents laid back to back (a window may run from one file into the next, as in
nanoGPT's concatenated token stream); inputs are the first ``context`` bytes, targets the
last. ``generate`` and ``next_byte_logits`` serve inference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from comms.errors import ConfigError
from island.workloads import (
    TRAIN_STREAM,
    VALIDATION_STREAM,
    BatchIterator,
    Document,
    Workload,
    check_seed,
    documents_fingerprint,
    mean_loss_no_grad,
    register_workload,
    select_documents,
)
from island.workloads.corpus import TextCorpus, TextDocuments, load_text_corpus

VOCAB = 256


@dataclasses.dataclass
class ByteLMConfig:
    data: list[str] = dataclasses.field(default_factory=list)  # files/folders; [] = Python stdlib
    val_fraction: float = 0.05  # share of files held out for validation (by path hash)
    context: int = 128  # bytes the model sees at once (its block size)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    d_model: int = 128  # residual stream width
    dropout: float = 0.0  # on attention, MLP and embeddings; 0 keeps steps deterministic
    bias: bool = True  # biases in Linear and LayerNorm layers
    batch_size: int = 16  # windows per training step
    val_seed: int = 0  # fixes the validation windows
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (CUDA when available)

    def validate(self) -> None:
        for key in ("context", "n_layer", "n_head", "d_model", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be at least 1, got {getattr(self, key)}")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model: {self.d_model} is not divisible by n_head {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.val_seed < 0:
            raise ConfigError(f"val_seed: must be non-negative, got {self.val_seed}")


class TextBatch(NamedTuple):
    inputs: torch.Tensor  # (B, T) int64 bytes
    targets: torch.Tensor  # (B, T) int64, inputs shifted left by one
    doc_index: torch.Tensor  # (B,) int64, the document each window starts in

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(*(t.to(device) for t in self))


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = CausalSelfAttention(d_model, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model, bias=bias),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ByteGPT(nn.Module):
    """Maps (B, T) byte ids, T <= context, to (B, T, 256) next-byte logits."""

    def __init__(
        self,
        context: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        self.context = context
        self.token_embedding = nn.Embedding(VOCAB, d_model)
        self.position_embedding = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self.lm_head = nn.Linear(d_model, VOCAB, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # weight tying
        self.apply(_init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        if length > self.context:
            raise ValueError(f"{length} bytes is longer than the model's context {self.context}")
        pos = torch.arange(length, device=idx.device)
        x = self.drop(self.token_embedding(idx) + self.position_embedding(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, 256)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())


def random_windows(
    rng: np.random.Generator, stream: np.ndarray, starts: np.ndarray, batch_size: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` windows of ``length`` bytes at uniform positions in ``stream``, and the
    index (into ``starts``) of the document each window begins in."""
    positions = rng.integers(0, len(stream) - length + 1, size=batch_size)
    windows = stream[positions[:, None] + np.arange(length)]  # (B, length)
    return windows, np.searchsorted(starts, positions, side="right") - 1


@register_workload("bytelm")
class ByteLMWorkload(Workload):
    Config = ByteLMConfig

    def __init__(self, config: ByteLMConfig | None = None):
        super().__init__(config)
        self.corpus: TextCorpus = load_text_corpus(self.config.data, self.config.val_fraction)

    def build_model(self, seed: int) -> ByteGPT:
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(check_seed(seed))
            model = ByteGPT(c.context, c.n_layer, c.n_head, c.d_model, c.dropout, c.bias)
        return model.to(self.device)

    def documents(self) -> list[Document]:
        return _as_documents(self.corpus.train)

    def validation_documents(self) -> list[Document]:
        return _as_documents(self.corpus.validation)

    def _window_source(self, docs: TextDocuments, chosen: list[int]):
        stream, starts = docs.stream(chosen)
        need = self.config.context + 1
        if len(stream) < need:
            raise ConfigError(
                f"the selected documents hold {len(stream)} bytes, fewer than context + 1 = "
                f"{need}; use a smaller context or more text"
            )
        doc_ids = np.asarray(chosen, dtype=np.int64)

        def make_batch(rng: np.random.Generator) -> TextBatch:
            windows, which = random_windows(rng, stream, starts, self.config.batch_size, need)
            w = torch.from_numpy(windows.astype(np.int64))
            batch = TextBatch(w[:, :-1], w[:, 1:], torch.from_numpy(doc_ids[which]))
            return batch.to(self.device) if self.device.type != "cpu" else batch

        return make_batch

    def train_batches(
        self,
        seed: int,
        shard: int = 0,
        num_shards: int = 1,
        doc_indices: Sequence[int] | None = None,
    ) -> BatchIterator[TextBatch]:
        seed = check_seed(seed)
        chosen = select_documents(len(self.corpus.train), shard, num_shards, doc_indices)
        fingerprint = documents_fingerprint("bytelm", seed, shard, num_shards, chosen)
        make_batch = self._window_source(self.corpus.train, chosen)
        return BatchIterator(make_batch, [seed, TRAIN_STREAM, shard], fingerprint)

    def loss(self, model: nn.Module, batch: TextBatch) -> torch.Tensor:
        logits = model(batch.inputs)  # (B, T, 256)
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch.targets.reshape(-1))

    def validation_loss(
        self,
        model: nn.Module,
        max_batches: int = 8,
        doc_indices: Sequence[int] | None = None,
    ) -> float:
        chosen = select_documents(len(self.corpus.validation), 0, 1, doc_indices)
        make_batch = self._window_source(self.corpus.validation, chosen)
        batches = BatchIterator(make_batch, [self.config.val_seed, VALIDATION_STREAM, 0], "val")
        return mean_loss_no_grad(self, model, batches, max_batches)

    def flops_per_step(self, batch_size: int | None = None) -> float:
        """PaLM's estimate (Chowdhery et al. 2022, appendix B): per token, 6 N for the matmuls
        forward and backward plus 12 L d T for attention scores, N counting every parameter
        but the position table (the tied embedding is also the output projection)."""
        c = self.config
        tokens = (batch_size or c.batch_size) * c.context
        n = 12 * c.n_layer * c.d_model**2 + VOCAB * c.d_model
        return float(tokens * (6 * n + 12 * c.n_layer * c.d_model * c.context))


def _as_documents(docs: TextDocuments) -> list[Document]:
    return [Document(doc_id, docs.content(i)) for i, doc_id in enumerate(docs.ids)]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def next_byte_logits(model: nn.Module, context_bytes: torch.Tensor) -> torch.Tensor:
    """Logits of the byte after ``context_bytes``: (T,) -> (256,), or (B, T) -> (B, 256).
    Only the last ``model.context`` bytes are used; the result is float32 on the CPU."""
    single = context_bytes.dim() == 1
    idx = context_bytes.unsqueeze(0) if single else context_bytes
    window = getattr(model, "context", idx.shape[1])
    idx = idx[:, -window:].to(device=_model_device(model), dtype=torch.long)
    logits = model(idx)[:, -1, :].float().cpu()  # (B, 256)
    return logits[0] if single else logits


def sample_byte(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """One byte from (256,) logits: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top byte always stays)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: nn.Module,
    prompt: bytes,
    max_new: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> bytes:
    """``max_new`` bytes continuing ``prompt`` (an empty prompt starts from a newline).
    Deterministic given ``seed``; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    out = bytearray(prompt or b"\n")
    try:
        for _ in range(max_new):
            ctx = torch.frombuffer(
                bytearray(out[-getattr(model, "context", len(out)) :]), dtype=torch.uint8
            )
            out.append(sample_byte(next_byte_logits(model, ctx), temperature, top_p, generator))
    finally:
        model.train(was_training)
    return bytes(out[len(prompt or b"\n") :])
