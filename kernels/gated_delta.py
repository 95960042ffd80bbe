"""The gated delta rule (Gated DeltaNet, Qwen3.5's linear attention) over a flat batch of sequences,
each with its recurrent state S [heads, k_dim, v_dim] (float32) in a row of the state tensor.
Per token: S <- exp(g) S; S <- S + k (beta (v - S^T k))^T; o = S^T q, with q and k L2-normalized and q
scaled by k_dim^-0.5. A prompt chunk continues from the state its previous chunk left.

References: `gated_delta_rule_ref` (token by token) and `chunked_span` (the same rule over
chunks of C tokens in a few matrix products, for long prompts). Dispatch: the Triton kernels
(`triton_gated_delta`: token by token, and chunked for prompts of CHUNK tokens or more) on CUDA
tensors, the references elsewhere."""

from __future__ import annotations

import os

import torch

from .gated_delta_inputs import CHUNK, normalize_qk
from .state_batch import StateBatch


def _initial(state: torch.Tensor, slot: int, initial: bool) -> torch.Tensor:
    return state[slot].float().clone() if initial else state.new_zeros(state.shape[1:], dtype=torch.float32)


def recurrent_span(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's tokens [n, H, *] (q, k normalized, all float32) from state s [H, dk, dv]."""
    out = torch.empty_like(v)
    for t in range(q.shape[0]):
        s = s * g[t].exp()[:, None, None]
        delta = beta[t][:, None] * (v[t] - torch.einsum("hk,hkv->hv", k[t], s))
        s = s + k[t][:, :, None] * delta[:, None, :]
        out[t] = torch.einsum("hk,hkv->hv", q[t], s)
    return out, s


def chunked_span(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                 s: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as recurrent_span, C tokens at a time. Within a chunk, with G the running sum of g
    from its start and d(i, j) = exp(G_i - G_j), the values actually written are
    U = (I + A)^-1 beta (V - exp(G) K S0), A[i, j] = beta_i d(i, j) k_i.k_j for j < i (a unit lower
    triangular solve); then o_i = exp(G_i) q_i S0 + sum_{j <= i} d(i, j) (q_i.k_j) u_j and
    S = exp(G_C) S0 + sum_j d(C, j) k_j u_j^T."""
    n = q.shape[0]
    out = torch.empty_like(v)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        qc, kc, vc = (x[a:b].transpose(0, 1) for x in (q, k, v))  # [H, c, d]
        gc, bc = g[a:b].t(), beta[a:b].t()  # [H, c]
        cum = gc.cumsum(-1)
        decay = (cum[:, :, None] - cum[:, None, :]).tril().exp().tril()  # d(i, j) for j <= i, else 0
        kk = kc @ kc.transpose(1, 2)
        lower = (bc[:, :, None] * decay * kk).tril(-1)
        eye = torch.eye(b - a, dtype=q.dtype, device=q.device)
        rhs = bc[:, :, None] * (vc - cum.exp()[:, :, None] * (kc @ s))
        u = torch.linalg.solve_triangular(eye + lower, rhs, upper=False, unitriangular=True)
        out[a:b] = (cum.exp()[:, :, None] * (qc @ s) + (decay * (qc @ kc.transpose(1, 2))) @ u).transpose(0, 1)
        tail = (cum[:, -1:] - cum).exp()  # d(C, j)
        s = cum[:, -1].exp()[:, None, None] * s + (kc * tail[:, :, None]).transpose(1, 2) @ u
    return out, s


def gated_delta_rule_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         state: torch.Tensor, batch: StateBatch, chunked_from: int = CHUNK) -> torch.Tensor:
    """q, k [T, H, dk] (raw: normalized here), v [T, H, dv], g and beta [T, H]; state [S, H, dk, dv]
    float32, updated in place. Returns [T, H, dv] in v's dtype. Prompts of `chunked_from` tokens or
    more take the chunked form, the rest go token by token (tests pass a huge one: all of them)."""
    qn, kn = normalize_qk(q, k)
    vf, gf, bf = v.float(), g.float(), beta.float()
    out = torch.empty_like(vf)
    qsl = batch.query_start_loc_host
    for i, (slot, initial) in enumerate(zip(batch.slots_host, batch.has_initial_host, strict=True)):
        a, b = qsl[i], qsl[i + 1]
        span = chunked_span if b - a >= chunked_from else recurrent_span
        out[a:b], final = span(qn[a:b], kn[a:b], vf[a:b], gf[a:b], bf[a:b], _initial(state, slot, initial))
        state[slot] = final
    return out.to(v.dtype)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor, batch: StateBatch) -> torch.Tensor:
    if q.is_cuda:
        from .triton_gated_delta import gated_delta_rule_triton

        # The chunked Triton form's first tiling needed 263 KB of shared memory at Qwen3.5's head sizes
        # (128 x 128), past the H200's 227 KB, and failed its GPU tests there. Retiled, it compiles for
        # sm_90 in 80 KB (tests/kernels/test_compile_sm90.py) but has not run on a GPU yet: until a GPU
        # session passes its tests, every sequence goes token by token there (the kernel the decode
        # graphs use) unless SLOTH_GATED_DELTA_CHUNKED=1 asks for the chunked form.
        chunked = os.environ.get("SLOTH_GATED_DELTA_CHUNKED") == "1"
        return gated_delta_rule_triton(q, k, v, g, beta, state, batch, chunked_from=CHUNK if chunked else 1 << 30)
    return gated_delta_rule_ref(q, k, v, g, beta, state, batch)
