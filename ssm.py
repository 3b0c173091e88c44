"""Selective scan and the Mamba (v1) mixer, CPU first.

Parameter names, shapes and initialisation follow state-spaces/mamba (Apache-2.0),
`mamba_ssm.modules.mamba_simple.Mamba`, so state_dicts load into either with strict=True.

All scan implementations share one signature and shape convention (those of mamba_ssm's
`selective_scan_fn`):
    u, delta, z: [B, D, L]; A: [D, N]; B, C: [B, N, L]; D, delta_bias: [D]; returns y [B, D, L],
with, per batch b and channel d (state size N):
    dt_t = softplus(delta_t + delta_bias) if delta_softplus else delta_t + delta_bias
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_{-1} = 0
    y_t = C_t . h_t + D * u_t,   then y_t *= silu(z_t) when z is given.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False
):
    """The scan as an obvious sequential loop: the oracle for every other implementation.

    Args and Returns: as `selective_scan` (computed in the dtype of u).
    """
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    # unbind, not indexing: each indexed step would cost a full-size gradient in backward
    steps = zip(dt.unbind(-1), B.unbind(-1), C.unbind(-1), u.unbind(-1))
    for dt_t, B_t, C_t, u_t in steps:
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * B_t[:, None]
        ys.append((h * C_t[:, None]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def _selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False
):
    # The exponentials and inputs for all steps are computed at once so the time loop holds
    # only the recurrence. Steps are unbound and outputs collected in a list: indexing a step
    # or writing into slices of a growing tensor would make the backward O(L^2).
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt = dt.transpose(1, 2)  # [B, L, D]
    dA = torch.exp(dt[..., None] * A)  # [B, L, D, N]
    dBu = (dt * u.transpose(1, 2))[..., None] * B.transpose(1, 2)[:, :, None, :]
    Ct = C.transpose(1, 2)  # [B, L, N]
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for dA_t, dBu_t, C_t in zip(dA.unbind(1), dBu.unbind(1), Ct.unbind(1)):
        h = dA_t * h + dBu_t
        ys.append(torch.matmul(h, C_t[:, :, None]))
    y = torch.cat(ys, dim=-1)  # [B, D, L]
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    impl="auto",
):
    """Selective state-space scan (mamba_ssm's `selective_scan_fn` semantics).

    Args:
        u: input [B, D, L].
        delta: step sizes before bias/softplus [B, D, L].
        A: state matrix (negative for stability) [D, N].
        B, C: input and output projections [B, N, L].
        D: skip weight [D] or None.
        z: gate [B, D, L] or None; the output is multiplied by silu(z).
        delta_bias: [D] or None, added to delta.
        delta_softplus: apply softplus to delta + delta_bias.
        impl: "auto", "ref", "torch", "compiled" or "cuda".
    Returns:
        y [B, D, L] in the dtype of u.
    """
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if impl == "ref":
        return selective_scan_ref(*args)
    if impl in ("torch", "auto", "compiled"):
        return _selective_scan_torch(*args)
    raise ValueError(f"unknown scan impl {impl!r}")


class Mamba(nn.Module):
    """Mamba (v1) mixer with mamba_ssm's parameter names, shapes and initialisation.

    Args:
        d_model: model width.
        d_state: SSM state size N.
        d_conv: causal depthwise conv kernel size.
        expand: d_inner = expand * d_model.
        dt_rank: rank of the dt projection; "auto" is ceil(d_model / 16).
        dt_min, dt_max: range of the initial step sizes (log-uniform).
        dt_init_floor: lower bound of the initial step sizes.
        conv_bias: bias in the depthwise conv.
        bias: bias in in_proj and out_proj.
        impl: scan implementation, see `selective_scan`.
    """

    def __init__(
        self,
        d_model,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank="auto",
        dt_min=0.001,
        dt_max=0.1,
        dt_init_floor=1e-4,
        conv_bias=True,
        bias=False,
        impl="auto",
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.impl = impl
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            bias=conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():
            # inverse of softplus: dt + log(1 - exp(-dt))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, x):
        # x: [B, L, d_model]
        length = x.shape[1]
        # in_proj as W @ x^T gives [B, 2*d_inner, L] directly: the scan wants time innermost
        xz = torch.matmul(self.in_proj.weight, x.transpose(1, 2))
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        u, z = xz.chunk(2, dim=1)  # [B, d_inner, L] each
        u = F.silu(self.conv1d(u)[..., :length])  # [B, d_inner, L]
        x_dbl = self.x_proj(u.transpose(1, 2))  # [B, L, dt_rank + 2N]
        dt, Bm, Cm = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = torch.matmul(self.dt_proj.weight, dt.transpose(1, 2))  # [B, d_inner, L]
        y = selective_scan(
            u,
            delta,
            -torch.exp(self.A_log.float()),
            Bm.transpose(1, 2),
            Cm.transpose(1, 2),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            impl=self.impl,
        )  # [B, d_inner, L]
        return self.out_proj(y.transpose(1, 2))  # [B, L, d_model]
