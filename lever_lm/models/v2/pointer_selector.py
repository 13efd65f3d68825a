"""PointerSelectorV2: the SFT pointer network that proposes ICD sequences (docs/formats.md §3.4).

For a query vector q [d] and a pool C [K, d]:
  1. project q and every candidate with `input_proj` (identity when d == h);
  2. L times: q = LayerNorm_i(MultiheadAttention_i(q, C, C) + q)   (1 head, q is the only token);
  3. state = normalize(query_proj(q)), cand = normalize(cand_proj(C)); logits = state @ cand.T / 0.1;
  4. each step picks one index; picked indices (and the query itself) are masked; with the gate,
     g = sigmoid(gate([state; cand[pick]])), state = normalize(g * state + (1 - g) * cand[pick]).

The module's parameter names are the checkpoint's names, so a Lightning state dict loads as is.
Inference is split so that nothing query-independent is computed twice: `encode_pool` projects
the pool once (keys and values of every attention layer, the normalised candidate projections),
`encode_queries` runs steps 1-3 for a batch of queries against it, and `next_log_probs` /
`advance` run one step for a batch of partial sequences. `forward` (teacher forcing, for
training) is built from the same pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGIT_TEMPERATURE = 0.1
# Rows of the pool processed together when attending over it (bounds the [B, chunk] score tensor).
POOL_CHUNK = 65_536


@dataclass
class PoolEncoding:
    """Query-independent projections of a candidate pool, computed once per pool."""

    keys: list[Tensor]  # per attention layer, [K, h]
    values: list[Tensor]  # per attention layer, [K, h]
    cand: Tensor  # [K, h], normalize(cand_proj(input_proj(C)))

    @property
    def size(self) -> int:
        return self.cand.shape[0]


class PointerSelectorV2(nn.Module):
    """The v2 pointer network; dimensions as in the checkpoint (d in, h hidden, L layers)."""

    def __init__(self, input_dim: int, hidden_dim: int = 256, num_layers: int = 1, use_gate: bool = False):
        super().__init__()
        self.input_dim, self.hidden_dim, self.num_layers, self.use_gate = input_dim, hidden_dim, num_layers, use_gate
        self.input_proj = nn.Linear(input_dim, hidden_dim, bias=False) if input_dim != hidden_dim else nn.Identity()
        self.cross_attn_layers = nn.ModuleList(
            nn.MultiheadAttention(hidden_dim, num_heads=1, batch_first=True) for _ in range(num_layers)
        )
        self.attn_norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(num_layers))
        self.query_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.cand_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.query_update_gate = nn.Linear(2 * hidden_dim, hidden_dim) if use_gate else None

    # -- inference pieces ------------------------------------------------------------------

    @torch.no_grad()
    def encode_pool(self, pool_emb: Tensor) -> PoolEncoding:
        """Project the pool [K, d] once: attention keys/values per layer, candidate projections."""
        return self._project_pool(pool_emb)

    def _project_pool(self, pool_emb: Tensor, dropout: float = 0.0) -> PoolEncoding:
        reduced = self.input_proj(pool_emb)  # [K, h]
        keys, values = [], []
        for attn in self.cross_attn_layers:
            _, w_k, w_v = attn.in_proj_weight.chunk(3)
            _, b_k, b_v = attn.in_proj_bias.chunk(3)
            keys.append(F.linear(reduced, w_k, b_k))
            values.append(F.linear(reduced, w_v, b_v))
        cand = F.normalize(self.cand_proj(F.dropout(reduced, dropout, self.training)), dim=-1)
        return PoolEncoding(keys=keys, values=values, cand=cand)

    def encode_queries(
        self, query_emb: Tensor, pool: PoolEncoding, exclude: Tensor | None = None, dropout: float = 0.0
    ) -> Tensor:
        """Initial states [B, h] for queries [B, d]; `exclude` [B] is each query's own pool row."""
        q = self.input_proj(query_emb)  # [B, h]
        for attn, norm, keys, values in zip(self.cross_attn_layers, self.attn_norms, pool.keys, pool.values):
            w_q = attn.in_proj_weight[: self.hidden_dim]
            b_q = attn.in_proj_bias[: self.hidden_dim]
            attended = _attend(F.linear(q, w_q, b_q) / math.sqrt(self.hidden_dim), keys, values, exclude)
            q = norm(attn.out_proj(attended) + q)
        return F.normalize(self.query_proj(F.dropout(q, dropout, self.training)), dim=-1)

    def step_logits(self, state: Tensor, pool: PoolEncoding, rows: slice | None = None) -> Tensor:
        """Unmasked logits [M, K] of the next pick for states [M, h]; `rows` limits them to a pool slice.

        The slice lets a search stream over the pool in cache-sized tiles instead of materialising
        [M, K] (1.8 MB per state at K = 443,757).
        """
        cand = pool.cand if rows is None else pool.cand[rows]
        return (state / LOGIT_TEMPERATURE) @ cand.T  # scale the [M, h] side: one pass less over [M, K]

    def next_log_probs(self, state: Tensor, pool: PoolEncoding, banned: Tensor) -> Tensor:
        """Log-probabilities [M, K] of the next index; `banned` [M, n] (picked ids, the query) get -inf.

        The plain, whole-pool form of one step: the proposals never build it (they stream the pool in
        tiles); the tests and benchmarks use it as the reference the tiled code must equal.
        """
        logits = self.step_logits(state, pool)
        logits.scatter_(1, banned, float("-inf"))
        return torch.log_softmax(logits, dim=-1)

    def advance(self, state: Tensor, picked: Tensor, pool: PoolEncoding) -> Tensor:
        """The state after picking `picked` [M]: gated update with the picked candidate, or unchanged."""
        if self.query_update_gate is None:
            return state
        chosen = pool.cand[picked]  # [M, h]
        gate = torch.sigmoid(self.query_update_gate(torch.cat([state, chosen], dim=-1)))
        return F.normalize(gate * state + (1 - gate) * chosen, dim=-1)

    # -- training --------------------------------------------------------------------------

    def forward(
        self, query_emb: Tensor, pool_emb: Tensor, labels: Tensor, exclude: Tensor | None = None, dropout: float = 0.0
    ) -> Tensor:
        """Teacher-forced log-probabilities [B, S, K] of each step for label sequences [B, S].

        `dropout` (training mode only): on the query's and the candidates' hidden vectors before
        `query_proj` / `cand_proj`, where the lineage's SFT puts its dropout (0.5 there).
        """
        pool = self._project_pool(pool_emb, dropout)
        state = self.encode_queries(query_emb, pool, exclude, dropout)
        banned = exclude.view(-1, 1) if exclude is not None else labels[:, :0]
        steps = []
        for t in range(labels.shape[1]):
            logits = self.step_logits(state, pool)
            if banned.shape[1]:
                logits = logits.scatter(1, banned, float("-inf"))
            steps.append(torch.log_softmax(logits, dim=-1))
            state = self.advance(state, labels[:, t], pool)
            banned = torch.cat([banned, labels[:, t : t + 1]], dim=1)
        return torch.stack(steps, dim=1)


def _attend(scaled_query: Tensor, keys: Tensor, values: Tensor, exclude: Tensor | None) -> Tensor:
    """Single-head attention of B query tokens over K keys, chunked over K (online softmax)."""
    B, K = scaled_query.shape[0], keys.shape[0]
    running_max = torch.full((B, 1), float("-inf"), dtype=keys.dtype, device=keys.device)
    denom = torch.zeros((B, 1), dtype=keys.dtype, device=keys.device)
    numer = torch.zeros((B, values.shape[1]), dtype=values.dtype, device=values.device)
    for start in range(0, K, POOL_CHUNK):
        scores = scaled_query @ keys[start : start + POOL_CHUNK].T  # [B, chunk]
        if exclude is not None:
            local = exclude - start
            inside = (local >= 0) & (local < scores.shape[1])
            if inside.any():
                rows = torch.nonzero(inside).squeeze(1)
                scores[rows, local[rows]] = float("-inf")
        new_max = torch.maximum(running_max, scores.max(dim=1, keepdim=True).values)
        rescale = torch.exp(running_max - new_max)
        weights = torch.exp(scores - new_max)
        denom = denom * rescale + weights.sum(dim=1, keepdim=True)
        numer = numer * rescale + weights @ values[start : start + POOL_CHUNK]
        running_max = new_max
    return numer / denom
