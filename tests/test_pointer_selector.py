"""PointerSelectorV2's split inference equals a direct computation with torch's own modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lever_lm.models.v2 import pointer_selector
from lever_lm.models.v2.pointer_selector import PointerSelectorV2


def _reference_log_probs(model: PointerSelectorV2, query: torch.Tensor, pool: torch.Tensor, seq: list[int], qidx: int):
    """Straightforward per-query computation with nn.MultiheadAttention, query row masked."""
    reduced_pool = model.input_proj(pool)
    q = model.input_proj(query).view(1, 1, -1)
    mask = torch.zeros(1, pool.shape[0], dtype=torch.bool)
    mask[0, qidx] = True
    for attn, norm in zip(model.cross_attn_layers, model.attn_norms):
        out, _ = attn(q, reduced_pool.unsqueeze(0), reduced_pool.unsqueeze(0), key_padding_mask=mask)
        q = norm(out + q)
    state = F.normalize(model.query_proj(q.view(1, -1)), dim=-1)
    cand = F.normalize(model.cand_proj(reduced_pool), dim=-1)
    banned = [qidx]
    result = []
    for pick in seq:
        logits = (state @ cand.T / 0.1).view(-1)
        logits[banned] = float("-inf")
        result.append(torch.log_softmax(logits, dim=-1))
        if model.query_update_gate is not None:
            g = torch.sigmoid(model.query_update_gate(torch.cat([state, cand[pick : pick + 1]], dim=-1)))
            state = F.normalize(g * state + (1 - g) * cand[pick : pick + 1], dim=-1)
        banned.append(pick)
    return torch.stack(result)


def test_split_inference_and_forward_match_reference(monkeypatch):
    monkeypatch.setattr(pointer_selector, "POOL_CHUNK", 7)  # exercise the chunked softmax
    torch.manual_seed(0)
    for use_gate, layers, d in ((False, 1, 24), (True, 2, 24), (True, 1, 16)):
        model = PointerSelectorV2(d, hidden_dim=16, num_layers=layers, use_gate=use_gate).eval()
        pool = torch.randn(30, d)
        queries = torch.tensor([3, 17])
        labels = torch.tensor([[5, 9], [0, 29]])
        with torch.no_grad():
            enc = model.encode_pool(pool)
            state = model.encode_queries(pool[queries], enc, exclude=queries)
            banned = queries.view(-1, 1)
            for t in range(2):
                got = model.next_log_probs(state, enc, banned)
                for b in range(2):
                    ref = _reference_log_probs(model, pool[queries[b]], pool, labels[b].tolist(), int(queries[b]))
                    torch.testing.assert_close(got[b], ref[t], rtol=1e-4, atol=1e-4)
                state = model.advance(state, labels[:, t], enc)
                banned = torch.cat([banned, labels[:, t : t + 1]], dim=1)
            forward = model(pool[queries], pool, labels, exclude=queries)
        for b in range(2):
            ref = _reference_log_probs(model, pool[queries[b]], pool, labels[b].tolist(), int(queries[b]))
            torch.testing.assert_close(forward[b], ref, rtol=1e-4, atol=1e-4)
        assert torch.isinf(forward[0, 1, 5]) and torch.isinf(forward[0, 0, 3])


def test_step_logits_of_a_pool_slice_equal_the_full_logits_sliced():
    torch.manual_seed(1)
    model = PointerSelectorV2(24, hidden_dim=16, num_layers=1, use_gate=True).eval()
    with torch.no_grad():
        enc = model.encode_pool(torch.randn(30, 24))
        state = F.normalize(torch.randn(3, 16), dim=-1)
        full = model.step_logits(state, enc)
        torch.testing.assert_close(model.step_logits(state, enc, rows=slice(7, 19)), full[:, 7:19])
