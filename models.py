"""The Wave-U-Mamba generator and the HiFi-GAN V1 discriminators.

The generator follows the authors' modules/waveumamba.py (infected4098/Wave-U-Mamba, MIT) as
described in SPEC section 1. The discriminators, ResBlock1 and the weight-norm conventions
follow jik876/hifi-gan (MIT).
"""

import dataclasses
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import ssm
import utils
from ssm import Mamba

# Every user of the generator imports this module: long inputs make tens-of-MB intermediates.
utils.keep_freed_memory()

LRELU_SLOPE = 0.1
# Slope 0.01, not 0.1: HiFi-GAN's Generator.forward calls F.leaky_relu(x) with the default
# before conv_post, and the authors inherited it.
HEAD_LRELU_SLOPE = 0.01
# Weight norm (torch.nn.utils.parametrizations) stores g and v as
# `<conv>.parametrizations.weight.original0` / `original1`; torch also loads state_dicts with
# the old `weight_g` / `weight_v` keys into it. Upstream's init_weights runs after weight_norm
# and so has no effect: every conv keeps PyTorch's default initialisation, and we call no init.


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of an odd kernel: (kernel_size - 1) * dilation / 2."""
    return (kernel_size - 1) * dilation // 2


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a [B, C, L] tensor, then LeakyReLU when a
    negative_slope is given."""

    def forward(self, x, negative_slope=None):
        # x: [B, C, L]
        fused_dtype = x.dtype in (torch.float32, torch.float64)
        if x.device.type == "cpu" and fused_dtype and not torch.is_grad_enabled():
            # Inference: one compiled pass instead of six PyTorch ones over a long sequence
            # (the same result: tests/test_models.py checks it against the code below).
            if ssm.compiled_kernel_available():
                return ssm.channel_norm_compiled(
                    x, self.weight, self.bias, self.eps, negative_slope
                )
        # Normalising over dim 1 in place of transpose + F.layer_norm keeps [B, C, L]
        # contiguous, so the next conv needs no copy (1.5-2x faster on CPU, fwd and bwd).
        mean = x.mean(1, keepdim=True)  # [B, 1, L]
        x = x - mean
        var = x.square().mean(1, keepdim=True)  # biased, as nn.LayerNorm
        x = x * torch.rsqrt(var + self.eps)
        x = torch.addcmul(self.bias[:, None], x, self.weight[:, None])  # [B, C, L]
        return x if negative_slope is None else F.leaky_relu(x, negative_slope)


class MambaResidualBlock(nn.Module):
    """x + Mamba(LayerNorm(x)): the residual block around ssm.Mamba (mamba.py's ResidualBlock),
    on channels-first x [B, C, L] like the rest of the U-Net (ssm.Mamba.mix)."""

    def __init__(self, channels, d_state, d_conv, expand, scan_impl):
        super().__init__()
        self.norm = ChannelLayerNorm(channels)
        self.mamba = Mamba(
            channels, d_state=d_state, d_conv=d_conv, expand=expand, impl=scan_impl
        )

    def forward(self, x):
        # x: [B, C, L]
        return x + self.mamba.mix(self.norm(x))[0]

    def forward_stream(self, x, state=None):
        """forward() on the next steps of a sequence, carrying the Mamba's state
        (ssm.Mamba.forward_stream): returns (y [B, C, L], state)."""
        y, state = self.mamba.forward_stream(self.norm(x), state)
        return x + y, state


class MambaStack(nn.Module):
    # On CPU without gradients (inference, validation) a sequence goes through in pieces of
    # CHUNK_STEPS steps, every block carrying its state from piece to piece: the same result as
    # one pass, with each intermediate small enough to stay in cache (bench_model: 1.3x faster
    # on 10 s). Training keeps the one pass, through which the scan's backward runs, and so
    # does CUDA, whose scan (mamba_ssm's) cannot start from a state.
    CHUNK_STEPS = 4096

    def __init__(self, channels, n_blocks, d_state, d_conv, expand, scan_impl):
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                MambaResidualBlock(channels, d_state, d_conv, expand, scan_impl)
                for _ in range(n_blocks)
            ]
        )

    def forward(self, x):
        # x: [B, C, L]
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            return self.forward_stream(x)[0]
        for block in self.blocks:
            x = block(x)
        return x

    def forward_stream(self, x, states=None):
        """The stack on the next steps of a sequence, carrying every block's state.

        Args:
            x: [B, C, n], the steps after those of the earlier calls.
            states: None at the start, else what the previous call returned.
        Returns:
            (y [B, C, n], states): calls on consecutive pieces give what forward() on the
            whole sequence gives.
        """
        states = list(states or [None] * len(self.blocks))
        pieces = []
        for start in range(0, x.shape[-1], self.CHUNK_STEPS):
            h = x[..., start : start + self.CHUNK_STEPS]  # [B, C, n]
            for i, block in enumerate(self.blocks):
                h, states[i] = block.forward_stream(h, states[i])
            pieces.append(h)
        return (torch.cat(pieces, dim=-1) if pieces else x), states


class ConvUnit(nn.Module):
    def __init__(self, c_in, c_out, kernel_size):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(c_in, c_out, kernel_size)
        self.norm = ChannelLayerNorm(c_out)

    def forward(self, x):
        # x: [B, C_in, L]
        # Right padding only, as the authors do: output t sees inputs t .. t + k - 1.
        x = self.conv(F.pad(x, (0, self.kernel_size - 1)))  # [B, C_out, L]
        return self.norm(x, LRELU_SLOPE)


class AvgPool2(nn.AvgPool1d):
    """nn.AvgPool1d(2, 2) as one add of the even and the odd samples: the same numbers (a sum
    halved), 8-10x faster on CPU than PyTorch's pooling kernel on the U-Net's long [B, C, T]
    (12 ms against 1.5 ms on [1, 32, 192,000], two threads)."""

    def __init__(self):
        super().__init__(2, 2)

    def forward(self, x):
        # x: [B, C, L] -> [B, C, L // 2]; an odd last sample is dropped, as by AvgPool1d
        x = x[..., : x.shape[-1] // 2 * 2]
        return (x[..., 0::2] + x[..., 1::2]) * 0.5


class EncoderBlock(nn.Module):
    """Down block (pool=True) or bottleneck (pool=False): two conv units, then Mamba."""

    def __init__(
        self,
        c_in,
        c_out,
        kernel_size,
        n_mamba,
        d_state,
        d_conv,
        expand,
        scan_impl,
        pool,
    ):
        super().__init__()
        self.conv_in = ConvUnit(c_in, c_out, kernel_size)
        self.conv_res = ConvUnit(c_out, c_out, kernel_size)
        self.pool = AvgPool2() if pool else nn.Identity()
        self.mamba = MambaStack(c_out, n_mamba, d_state, d_conv, expand, scan_impl)

    def forward(self, x):
        # x: [B, C_in, L]
        x = self.conv_in(x)  # [B, C_out, L]
        x = x + self.conv_res(x)
        x = self.pool(x)  # [B, C_out, L / 2] (or L)
        return self.mamba(x)


class ResBlock(nn.Module):
    """HiFi-GAN ResBlock1: per dilation, lrelu -> dilated conv -> lrelu -> conv -> + input."""

    def __init__(self, channels, kernel_size, dilations):
        super().__init__()
        self.convs1 = nn.ModuleList(
            [
                weight_norm(
                    nn.Conv1d(
                        channels,
                        channels,
                        kernel_size,
                        dilation=d,
                        padding=get_padding(kernel_size, d),
                    )
                )
                for d in dilations
            ]
        )
        self.convs2 = nn.ModuleList(
            [
                weight_norm(
                    nn.Conv1d(
                        channels,
                        channels,
                        kernel_size,
                        padding=get_padding(kernel_size),
                    )
                )
                for _ in dilations
            ]
        )

    def forward(self, x):
        # x: [B, C, L]
        for conv1, conv2 in zip(self.convs1, self.convs2):
            xt = conv1(F.leaky_relu(x, LRELU_SLOPE))
            xt = conv2(F.leaky_relu(xt, LRELU_SLOPE))
            x = x + xt
        return x


class UpBlock(nn.Module):
    def __init__(
        self,
        c_in,
        c_out,
        kernel_size,
        n_mamba,
        resblock_kernel,
        resblock_dilations,
        d_state,
        d_conv,
        expand,
        scan_impl,
    ):
        super().__init__()
        # stride 2 with padding (k - 2) / 2 doubles the length exactly
        self.up = weight_norm(
            nn.ConvTranspose1d(c_in, c_out, kernel_size, 2, (kernel_size - 2) // 2)
        )
        self.mamba = MambaStack(c_out, n_mamba, d_state, d_conv, expand, scan_impl)
        self.resblock = ResBlock(c_out, resblock_kernel, resblock_dilations)

    def forward(self, x, skip):
        # x, skip: [B, C_in, L]
        x = F.leaky_relu(x, LRELU_SLOPE) + skip
        x = self.up(x)  # [B, C_out, 2L]
        x = self.mamba(x)
        return self.resblock(x)


class WaveUMamba(nn.Module):
    """Wave-U-Mamba generator: a 1-D U-Net with Mamba blocks in every stage (SPEC section 1).

    The keyword arguments are the keys of cfgs.json's `model` section; the defaults build the
    paper's model (4,203,714 parameters with weight norm).

    Args:
        channels: encoder widths, one per down block; the decoder mirrors them and ends at
            channels[0] // 2.
        down_kernel: kernel of the encoder conv units.
        bottleneck_kernel: kernel of the bottleneck conv units.
        up_kernels: ConvTranspose1d kernels of the decoder stages (even, >= 2).
        resblock_kernel, resblock_dilations: decoder ResBlock1 settings.
        head_kernel: kernel of the output conv (odd).
        n_mamba_down, n_mamba_bottleneck, n_mamba_up: Mamba blocks per stage.
        d_state, d_conv, expand: Mamba mixer sizes.
        scan_impl: selective-scan implementation passed to every Mamba (see ssm.selective_scan).
    """

    def __init__(
        self,
        channels=(32, 64, 128, 256),
        down_kernel=4,
        bottleneck_kernel=3,
        up_kernels=(4, 4, 8, 8),
        resblock_kernel=3,
        resblock_dilations=(1, 3),
        head_kernel=7,
        n_mamba_down=2,
        n_mamba_bottleneck=3,
        n_mamba_up=2,
        d_state=16,
        d_conv=4,
        expand=2,
        scan_impl="auto",
    ):
        super().__init__()
        channels = tuple(channels)
        if not channels or channels[0] < 2:
            raise ValueError(
                f"channels must be non-empty with channels[0] >= 2, got {channels}"
            )
        if len(up_kernels) != len(channels):
            raise ValueError(
                f"need one up kernel per stage ({len(channels)}), got up_kernels={up_kernels}"
            )
        if any(k < 2 or k % 2 for k in up_kernels):
            raise ValueError(f"up kernels must be even and >= 2, got {up_kernels}")
        if head_kernel % 2 == 0 or resblock_kernel % 2 == 0:
            raise ValueError(
                f"head and resblock kernels must be odd, got {head_kernel}, {resblock_kernel}"
            )
        self.hop = utils.unet_hop(channels)
        mamba_args = (d_state, d_conv, expand, scan_impl)
        c_ins = (1,) + channels[:-1]
        self.downs = nn.ModuleList(
            [
                EncoderBlock(
                    c_in, c_out, down_kernel, n_mamba_down, *mamba_args, pool=True
                )
                for c_in, c_out in zip(c_ins, channels)
            ]
        )
        self.down_norms = nn.ModuleList([ChannelLayerNorm(c) for c in channels])
        self.bottleneck = EncoderBlock(
            channels[-1],
            channels[-1],
            bottleneck_kernel,
            n_mamba_bottleneck,
            *mamba_args,
            pool=False,
        )
        self.bottleneck_norm = ChannelLayerNorm(channels[-1])
        # Each stage maps to the width of the next skip it meets; the last one halves.
        up_ins = channels[::-1]
        up_outs = channels[-2::-1] + (channels[0] // 2,)
        self.ups = nn.ModuleList(
            [
                UpBlock(
                    c_in,
                    c_out,
                    k,
                    n_mamba_up,
                    resblock_kernel,
                    resblock_dilations,
                    *mamba_args,
                )
                for c_in, c_out, k in zip(up_ins, up_outs, up_kernels)
            ]
        )
        self.head = weight_norm(
            nn.Conv1d(up_outs[-1], 1, head_kernel, padding=get_padding(head_kernel))
        )

    def forward(self, x):
        """Super-resolve a batch of 48 kHz waveforms.

        Args:
            x: low-resolution input resampled to 48 kHz, [B, 1, T], T a multiple of
                2 ** len(channels) (16 for the paper's model).
        Returns:
            y_hat [B, 1, T]: x plus the generated residual (in [-1, 1]).
        """
        # x: [B, 1, T]
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[2] == 0 or x.shape[2] % self.hop:
            raise ValueError(
                f"expected input [B, 1, T] with T a positive multiple of {self.hop}, "
                f"got {tuple(x.shape)}"
            )
        skips = [x]
        h = x
        for down, norm in zip(self.downs, self.down_norms):
            h = down(h)  # [B, C_i, T / 2^(i+1)]
            # the skip is stored before the stem norm, as in the authors' Downsamplestem
            skips.append(h)
            h = norm(h, LRELU_SLOPE)
        h = self.bottleneck_norm(
            self.bottleneck(h)
        )  # [B, C_last, T / hop], no activation
        for up, skip in zip(self.ups, skips[:0:-1]):
            h = up(h, skip)  # [B, C_out, 2 L]
        h = self.head(F.leaky_relu(h, HEAD_LRELU_SLOPE))  # [B, 1, T]
        return x + torch.tanh(h)

    def remove_weight_norm(self):
        """Fold weight norm into plain weights for inference (output unchanged)."""
        for module in list(self.modules()):
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight")

    @torch.no_grad()
    def head_nyquist_gain(self) -> torch.Tensor:
        """[1, C, 1]: the head's response at 24 kHz to each input channel (up to sign)."""
        weight = self.head.weight  # [1, C, K]
        return (weight * _alternating(weight)).sum(-1, keepdim=True)

    @torch.no_grad()
    def zero_head_nyquist(self):
        """Project the head's kernel so that no input channel passes the Nyquist frequency.

        Deviation: the authors' head is unconstrained. Why: the decoder's stride-2 transposed
        convs leave a constant checkerboard (a 24 kHz alternation) in the last features, and the
        head only nearly cancels it; what is left is a 24 kHz tone that neither reconstruction
        loss sees (both are mel-projected). With every channel's kernel orthogonal to
        (+1, -1, +1, ...) the head has a zero at 24 kHz. The smallest such change: subtract each
        channel's projection on that sequence.
        """
        weight = self.head.weight  # [1, C, K], folded from weight norm when it is on
        alternating = _alternating(weight)
        projected = weight - self.head_nyquist_gain() * alternating / weight.shape[-1]
        if parametrize.is_parametrized(self.head, "weight"):
            weight_norm_of = self.head.parametrizations.weight
            g, v = weight_norm_of[0].right_inverse(projected)
            # copied in place: DDP and the optimiser hold on to these very tensors
            weight_norm_of.original0.copy_(g)
            weight_norm_of.original1.copy_(v)
        else:
            self.head.weight.copy_(projected)


def _alternating(weight: torch.Tensor) -> torch.Tensor:
    """(+1, -1, +1, ...) along weight's last axis: a kernel's dot product with it is its gain
    at the Nyquist frequency."""
    signs = torch.ones(weight.shape[-1], dtype=weight.dtype, device=weight.device)
    signs[1::2] = -1
    return signs


# The (k, 1) kernels of DiscriminatorP see each of the p columns alone, so the Conv2d on
# [B, C, H, p] is a conv1d on the columns as batch items [B p, C, H]: the same sums. PyTorch's
# CPU convolutions (oneDNN) ran the narrow 2-D layout of periods 2, 3, 5 1.05-1.6x slower than
# the folded one, period 7 about as fast (0.8-1.0x) and period 11 1.15x faster (forward and
# backward, 2 threads, batch 4 x 25,600; bench/bench_conv.py); the multi-period
# discriminator's part of a GAN step went 9.1 -> 7.8 s.
COLUMNS_AS_BATCH_MAX_PERIOD = 5


def _period_conv(conv, x):
    # conv, a Conv2d with a (k, 1) kernel, on x [B, C, H, p] or on the columns as batch items
    # x [B p, C, H]
    weight = conv.weight if x.dim() == 4 else conv.weight[..., 0]
    if x.device.type == "cpu" and conv.stride[0] == 1 and conv.kernel_size[0] == WINOGRAD_TAPS:
        return winograd_conv(x, weight, conv.bias)
    conv_fn = F.conv2d if x.dim() == 4 else F.conv1d
    return conv_fn(x, weight, conv.bias, conv.stride[: x.dim() - 2], conv.padding[: x.dim() - 2])


# The stride-1, 5-tap layers of both discriminators (MPD's last 1024 -> 1024, MSD's
# 1024 -> 1024 after its grouped layers; 45 % of their convolution FLOPs) run as Winograd
# F(4, 5) on CPU: each output takes 8 / 4 = 2 products of the channel sums instead of 5, as
# 8 matrix products [C_out, C_in] x [C_in, tiles], which autograd's backward keeps. In float32
# its error is 2.5-5x a direct convolution's (1.2-2e-6 against 4-5e-7 of the largest output
# for 1,024 channels, measured); points 0, +-1, +-2, +-1/2, the usual ones for F(6, 3). F(6, 5)
# with +-3 as well ran a little faster but erred by 2.4e-5.
WINOGRAD_TAPS = 5
_WINOGRAD = ssm.winograd_matrices(4, WINOGRAD_TAPS, [0, 1, -1, 2, -2, 0.5, -0.5])


def winograd_conv(x, weight, bias):
    """Stride-1 'same' convolution along dim 2 of x [N, C, L] or [N, C, L, P] with a 5-tap
    weight [K, C, 5] or [K, C, 5, 1] and bias [K] or None: what F.conv1d / F.conv2d with
    padding 2 compute, by Winograd F(4, 5) (see _WINOGRAD), differentiable."""
    a_t, g, b_t = (t.to(x) for t in _WINOGRAD)
    outputs, n = a_t.shape
    (nb, c_in, length), columns = x.shape[:3], x.shape[3:]
    c_out, pad = weight.shape[0], WINOGRAD_TAPS // 2
    x = x if columns else x[..., None]  # [N, C, L, P]
    tiles = -(-length // outputs)
    x = F.pad(x, (0, 0, pad, tiles * outputs + WINOGRAD_TAPS - 1 - length - pad))
    d = x.unfold(2, n, outputs)  # [N, C, tiles, P, n], overlapping views
    v = torch.einsum("ij,nctpj->icntp", b_t, d).reshape(n, c_in, -1)
    # [n, r] x [r, K C], one matrix product: einsum's batched one ran the forward 3x slower
    taps_first = weight.reshape(c_out, c_in, WINOGRAD_TAPS).permute(2, 0, 1)
    u = (g @ taps_first.reshape(WINOGRAD_TAPS, -1)).view(n, c_out, c_in)
    m = torch.bmm(u, v).view(n, c_out, nb, tiles, -1)
    y = torch.einsum("ij,jkntp->nktip", a_t, m).reshape(nb, c_out, tiles * outputs, -1)
    y = y[:, :, :length]
    y = y + bias[:, None, None] if bias is not None else y.contiguous()
    return y if columns else y[..., 0]


def _unfold_columns(x, batch):
    # [B p, C, H] -> [B, C, H, p], a view
    return x.view(batch, -1, *x.shape[1:]).permute(0, 2, 3, 1)


class DiscriminatorP(nn.Module):
    def __init__(self, period, kernel_size=5, stride=3):
        super().__init__()
        self.period = period
        chans = (1, 32, 128, 512, 1024)
        self.convs = nn.ModuleList(
            [
                weight_norm(
                    nn.Conv2d(
                        c_in,
                        c_out,
                        (kernel_size, 1),
                        (stride, 1),
                        padding=(get_padding(kernel_size), 0),
                    )
                )
                for c_in, c_out in zip(chans[:-1], chans[1:])
            ]
            + [
                weight_norm(
                    nn.Conv2d(
                        1024,
                        1024,
                        (kernel_size, 1),
                        padding=(get_padding(kernel_size), 0),
                    )
                )
            ]
        )
        self.conv_post = weight_norm(nn.Conv2d(1024, 1, (3, 1), padding=(1, 0)))

    def forward(self, x):
        # x: [B, 1, T]
        fmap = []
        p = self.period
        if x.shape[-1] % p:
            x = F.pad(x, (0, p - x.shape[-1] % p), "reflect")
        b, c, t = x.shape
        x = x.view(b, c, t // p, p)  # [B, 1, T / p, p]
        folded = p <= COLUMNS_AS_BATCH_MAX_PERIOD
        if folded:
            x = x.permute(0, 3, 1, 2).reshape(b * p, c, t // p)  # [B p, 1, T / p]
        for conv in [*self.convs, self.conv_post]:
            x = _period_conv(conv, x)
            if conv is not self.conv_post:
                x = F.leaky_relu(x, LRELU_SLOPE)
            fmap.append(_unfold_columns(x, b) if folded else x)  # [B, C, frames, p]
        return torch.flatten(fmap[-1], 1, -1), fmap  # [B, frames * p]


def _score_real_and_fake(discriminators, ys, y_hats):
    """(d_real, d_fake, fmap_real, fmap_fake): each sub-discriminator on its real and fake input."""
    d_real, d_fake, fmap_real, fmap_fake = [], [], [], []
    for d, y, y_hat in zip(discriminators, ys, y_hats):
        score, fmap = d(y)
        d_real.append(score)
        fmap_real.append(fmap)
        score, fmap = d(y_hat)
        d_fake.append(score)
        fmap_fake.append(fmap)
    return d_real, d_fake, fmap_real, fmap_fake


class MultiPeriodDiscriminator(nn.Module):
    """HiFi-GAN V1 multi-period discriminator (periods 2, 3, 5, 7, 11).

    Called as d(y, y_hat) with y, y_hat [B, 1, T]; returns (d_real, d_fake, fmap_real,
    fmap_fake): lists of per-sub-discriminator scores [B, N] and lists of feature maps.
    """

    def __init__(self, periods=(2, 3, 5, 7, 11)):
        super().__init__()
        self.discriminators = nn.ModuleList([DiscriminatorP(p) for p in periods])

    def forward(self, y, y_hat):
        # y, y_hat: [B, 1, T]
        n = len(self.discriminators)
        return _score_real_and_fake(self.discriminators, [y] * n, [y_hat] * n)


class GroupedConv1d(nn.Conv1d):
    """nn.Conv1d (zero padding, no dilation) that runs on CPU in the compiled kernel
    (ssm.conv1d_compiled, forward and backward) when it builds, and as nn.Conv1d elsewhere:
    the same parameters and results, for the multi-scale discriminator's grouped layers."""

    def _conv_forward(self, x, weight, bias):
        if (
            x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and ssm.compiled_kernel_available()
        ):
            return ssm.conv1d_compiled(
                x, weight, bias, self.stride[0], self.padding[0], self.groups
            )
        return super()._conv_forward(x, weight, bias)


class WinogradConv1d(nn.Conv1d):
    """nn.Conv1d for a 5-tap 'same' kernel at stride 1 that runs on CPU as winograd_conv, and as
    nn.Conv1d elsewhere: the same parameters and results, for the multi-scale discriminator's
    1024 -> 1024 layer."""

    def _conv_forward(self, x, weight, bias):
        if x.device.type == "cpu":
            return winograd_conv(x, weight, bias)
        return super()._conv_forward(x, weight, bias)


def _msd_conv_class(kernel_size, stride, groups):
    if groups > 1:
        return GroupedConv1d
    return WinogradConv1d if (kernel_size, stride) == (WINOGRAD_TAPS, 1) else nn.Conv1d


class DiscriminatorS(nn.Module):
    def __init__(self, use_spectral_norm=False):
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        # (c_in, c_out, kernel, stride, groups)
        layers = (
            (1, 128, 15, 1, 1),
            (128, 128, 41, 2, 4),
            (128, 256, 41, 2, 16),
            (256, 512, 41, 4, 16),
            (512, 1024, 41, 4, 16),
            (1024, 1024, 41, 1, 16),
            (1024, 1024, 5, 1, 1),
        )
        self.convs = nn.ModuleList(
            [
                norm(
                    _msd_conv_class(k, s, g)(c_in, c_out, k, s, groups=g, padding=get_padding(k))
                )
                for c_in, c_out, k, s, g in layers
            ]
        )
        self.conv_post = norm(nn.Conv1d(1024, 1, 3, padding=1))

    def forward(self, x):
        # x: [B, 1, T]
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            fmap.append(x)
        x = self.conv_post(x)  # [B, 1, frames]
        fmap.append(x)
        return torch.flatten(x, 1, -1), fmap  # [B, frames]


class MultiScaleDiscriminator(nn.Module):
    """HiFi-GAN V1 multi-scale discriminator: raw, x2- and x4-average-pooled waveform.

    Called as d(y, y_hat) with y, y_hat [B, 1, T]; returns (d_real, d_fake, fmap_real,
    fmap_fake): lists of per-scale scores [B, N] and lists of feature maps.
    """

    def __init__(self):
        super().__init__()
        self.discriminators = nn.ModuleList(
            [DiscriminatorS(use_spectral_norm=True), DiscriminatorS(), DiscriminatorS()]
        )
        self.meanpools = nn.ModuleList(
            [nn.AvgPool1d(4, 2, padding=2), nn.AvgPool1d(4, 2, padding=2)]
        )

    def forward(self, y, y_hat):
        # y, y_hat: [B, 1, T]
        ys, y_hats = [y], [y_hat]
        for pool in self.meanpools:
            ys.append(pool(ys[-1]))  # [B, 1, ~T / 2^i]
            y_hats.append(pool(y_hats[-1]))
        return _score_real_and_fake(self.discriminators, ys, y_hats)


def _generator_state(checkpoint, path: str) -> tuple[dict, dict | None]:
    """(state_dict without DDP prefixes, float32; config dict or None) from any checkpoint."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a checkpoint dict")
    if "generator" in checkpoint:
        state, config = checkpoint["generator"], checkpoint.get("config")
    elif checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        state, config = checkpoint, None
    else:
        raise ValueError(
            f"{path}: holds no generator (keys {sorted(map(str, checkpoint))[:6]}); "
            "pass a g_ checkpoint or a generator state_dict"
        )
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()
    ):
        raise ValueError(f"{path}: its generator is not a state_dict of named tensors")
    unusable = [
        k
        for k, v in state.items()
        if v.is_complex() or (v.is_floating_point() and not torch.isfinite(v).all())
    ]
    if unusable:
        raise ValueError(
            f"{path}: {len(unusable)} weight(s) hold NaN, Inf or complex values, e.g. "
            f"{unusable[0]}"
        )
    state = {
        k.removeprefix("module."): v.float() if v.is_floating_point() else v
        for k, v in state.items()
    }
    return state, config


def _generator_config(cfgs_path, config: dict | None, checkpoint_path: str):
    """The config from cfgs_path, else the checkpoint, else a file beside it, else the repo."""
    if cfgs_path is not None:
        return utils.load_config(cfgs_path)
    if config is not None:
        return utils.config_from_checkpoint(config, f"{checkpoint_path} (config)")
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    for name in ("config.json", "cfgs.json"):
        if os.path.isfile(os.path.join(folder, name)):
            return utils.load_config(os.path.join(folder, name))
    repo = os.path.dirname(os.path.abspath(__file__))
    return utils.load_config(os.path.join(repo, "cfgs.json"))


def read_generator_checkpoint(path: str) -> tuple[dict, dict | None, int | None]:
    """(float32 state_dict without DDP prefixes, config dict or None, step or None) of any
    generator checkpoint: a g_ file, an exported model or a bare state_dict."""
    checkpoint = utils.load_checkpoint(path)
    state, config = _generator_state(checkpoint, path)
    step = checkpoint.get("step") if "generator" in checkpoint else None
    if step is not None and (type(step) is not int or step < 0):
        raise ValueError(f"{path}: its step must be a count of steps, not {step!r}")
    return state, config, step


def load_generator(path: str, cfgs_path: str | None = None, scan_impl: str = "auto"):
    """Loads a generator for inference from any of our checkpoints.

    Args:
        path: a g_ checkpoint ({"generator", "config", "step"}), possibly saved under DDP
            ("module." prefixes), or a bare generator state_dict, with or without weight
            norm; float16 weights are cast to float32.
        cfgs_path: config JSON; default the checkpoint's own config, else config.json or
            cfgs.json beside the checkpoint, else the repo's cfgs.json.
        scan_impl: selective-scan implementation of the Mamba blocks.
    Returns:
        (WaveUMamba in eval mode on the CPU with weight norm removed, Config, step or None).
        Raises ValueError with a one-line reason when the file does not fit.
    """
    state, config, step = read_generator_checkpoint(path)
    cfg = _generator_config(cfgs_path, config, path)
    generator = WaveUMamba(**dataclasses.asdict(cfg.model), scan_impl=scan_impl)
    # A checkpoint saved after remove_weight_norm has plain weights: match it.
    weight_normed = any(".parametrizations.weight." in k for k in state)
    if not weight_normed:
        generator.remove_weight_norm()
    expected = generator.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = [
        k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape
    ]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{path} does not fit the model of its config: {len(missing)} missing "
            f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, "
            f"{len(reshaped)} of another shape {sorted(reshaped)[:2]}"
        )
    generator.load_state_dict(state)
    if weight_normed:
        generator.remove_weight_norm()
    return generator.eval(), cfg, step
