"""A Mamba-2 layer's input-independent parameters (SSMParams). Ground floor of the SSD kernels: the
references (ssd.py) and the Triton kernels (triton_ssd.py) both read it, and it imports neither."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SSMParams:
    """A Mamba-2 layer's input-independent parameters (per head)."""

    A: torch.Tensor  # [H] float32, negative: -exp(A_log)
    D: torch.Tensor  # [H] skip connection
    dt_bias: torch.Tensor  # [H]
    dt_min: float = 0.0  # config.time_step_limit
    dt_max: float = math.inf
