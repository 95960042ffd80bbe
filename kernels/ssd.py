"""Mamba-2's selective state-space core (SSD) over a flat batch of sequences, each owning a row of
an SSM state tensor [slots, H, P, N] (heads, head dim, state size): the one-token update of a decode
step and the chunked scan of a prompt chunk, which starts from the sequence's state (or zeros) and
leaves its final state, so chunked prefill equals one pass. dt goes through dt_bias, softplus and the
[dt_min, dt_max] limits here. Dispatch: Triton (`triton_ssd`) on CUDA tensors, the references elsewhere."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ssm_params import SSMParams


def discretize_dt_ref(dt: torch.Tensor, params: SSMParams) -> torch.Tensor:
    """float32 softplus(dt + dt_bias) clamped to the limits (softplus is linear past 20, as torch's)."""
    return F.softplus(dt.float() + params.dt_bias.float()).clamp(params.dt_min, params.dt_max)


def _per_head(m: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., G, N] -> [..., H, N] float32: heads h of group h // (H / G) share its B or C."""
    return m.float().repeat_interleave(num_heads // m.shape[-2], dim=-2)


def ssd_update_ref(x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, params: SSMParams,
                   ssm_state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """One decode step per row: state = exp(dt A) state + dt x B^T; y = state C + D x.
    x [T, H, P], dt [T, H], B / C [T, G, N], ssm_state [S, H, P, N] (rows `slots` [T] updated in
    place; a slot < 0 is a padding row: no state touched, y = 0). Returns y [T, H, P] in x's dtype."""
    y = torch.zeros_like(x)
    live = (slots >= 0).nonzero().flatten()
    if live.numel() == 0:
        return y
    rows = slots[live].long()
    num_heads = x.shape[1]
    xf, d = x[live].float(), discretize_dt_ref(dt[live], params)  # [L, H, P], [L, H]
    state = ssm_state[rows].float() * torch.exp(d * params.A.float())[..., None, None]
    state = state + (d[..., None] * xf)[..., None] * _per_head(B[live], num_heads)[:, :, None, :]
    out = (state * _per_head(C[live], num_heads)[:, :, None, :]).sum(-1) + params.D.float()[:, None] * xf
    ssm_state[rows] = state.to(ssm_state.dtype)
    y[live] = out.to(x.dtype)
    return y


def _scan_sequence(x: torch.Tensor, d: torch.Tensor, B: torch.Tensor, C: torch.Tensor, A: torch.Tensor,
                   state: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence in float32: x [n, H, P], d [n, H] (discretized), B / C [n, H, N], state [H, P, N].
    Within a chunk the output is the masked, decayed C B^T applied to dt x (the quadratic form), plus
    the carried state read through C; the state then decays over the chunk and takes its inputs."""
    out = torch.empty_like(x)
    for c0 in range(0, x.shape[0], chunk):
        xs, ds, bs, cs = x[c0 : c0 + chunk], d[c0 : c0 + chunk], B[c0 : c0 + chunk], C[c0 : c0 + chunk]
        cum = torch.cumsum(ds * A, dim=0)  # [L, H]: log of the decay from the chunk start
        n = xs.shape[0]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        # decay[i, j] = exp(cum[i] - cum[j]) for j <= i: masked before exp (the others would overflow)
        diff = (cum[:, None, :] - cum[None, :, :]).masked_fill(~causal[..., None], -math.inf)
        weights = torch.einsum("ihn,jhn->ijh", cs, bs) * torch.exp(diff) * ds[None]
        y = torch.einsum("ijh,jhp->ihp", weights, xs)
        y = y + torch.einsum("ihn,hpn->ihp", cs, state) * torch.exp(cum)[..., None]
        out[c0 : c0 + chunk] = y
        to_end = torch.exp(cum[-1][None] - cum) * ds  # [L, H]: each input's decay to the chunk end
        state = state * torch.exp(cum[-1])[:, None, None] + torch.einsum("jh,jhn,jhp->hpn", to_end, bs, xs)
    return out, state


def ssd_chunk_scan_ref(x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       params: SSMParams, ssm_state: torch.Tensor, query_start_loc: torch.Tensor,
                       slots: torch.Tensor, has_initial: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """Sequence b's tokens are rows [query_start_loc[b], query_start_loc[b + 1]) of x [T, H, P],
    dt [T, H], B / C [T, G, N]; it starts from ssm_state[slots[b]] when has_initial[b] (else zeros)
    and writes its final state there. Returns y [T, H, P] (D x included) in x's dtype; chunk_size
    only bounds memory, the result does not depend on it."""
    y = torch.empty_like(x)
    num_heads = x.shape[1]
    d_all = discretize_dt_ref(dt, params)
    qsl = query_start_loc.tolist()
    for b, (slot, initial) in enumerate(zip(slots.tolist(), has_initial.tolist(), strict=True)):
        start, end = qsl[b], qsl[b + 1]
        if end == start:
            continue
        init = ssm_state[slot].float() if initial else ssm_state.new_zeros(ssm_state.shape[1:], dtype=torch.float32)
        xs = x[start:end].float()
        out, final = _scan_sequence(xs, d_all[start:end], _per_head(B[start:end], num_heads),
                                    _per_head(C[start:end], num_heads), params.A.float(), init, chunk_size)
        y[start:end] = (out + params.D.float()[:, None] * xs).to(x.dtype)
        ssm_state[slot] = final.to(ssm_state.dtype)
    return y


def ssd_update(x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, params: SSMParams,
               ssm_state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from .triton_ssd import ssd_update_triton

        return ssd_update_triton(x, dt, B, C, params, ssm_state, slots)
    return ssd_update_ref(x, dt, B, C, params, ssm_state, slots)


def ssd_chunk_scan(x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, params: SSMParams,
                   ssm_state: torch.Tensor, query_start_loc: torch.Tensor, slots: torch.Tensor,
                   has_initial: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from .triton_ssd import ssd_chunk_scan_triton

        return ssd_chunk_scan_triton(x, dt, B, C, params, ssm_state, query_start_loc, slots, has_initial)
    return ssd_chunk_scan_ref(x, dt, B, C, params, ssm_state, query_start_loc, slots, has_initial)
