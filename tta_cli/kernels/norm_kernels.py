"""The Triton kernels behind triton_norm.py: GroupNorm followed by ReLU, forward and backward, one program per
(image, group) holding the whole group in registers. Device code only; without triton this module defines nothing
but `triton = None`.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # torch wheels without triton: triton_norm falls back to torch
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _group_tile(x, C, HW, CPG: tl.constexpr, BC: tl.constexpr, BHW: tl.constexpr):
        """Offsets of program (n, g)'s group in an NCHW tensor as a (BC, BHW) tile of (channel, pixel), its mask,
        and the tile's channel indices."""
        row = tl.program_id(0)  # n * G + g
        groups = C // CPG
        n = row // groups
        channels = (row % groups) * CPG + tl.arange(0, BC)
        pixels = tl.arange(0, BHW)
        mask = (tl.arange(0, BC) < CPG)[:, None] & (pixels < HW)[None, :]
        offsets = n * C * HW + channels[:, None] * HW + pixels[None, :]
        return offsets, mask, channels

    @triton.jit
    def group_norm_relu_kernel(
        x, weight, bias, y, mean, rstd, C, HW, eps,
        CPG: tl.constexpr, BC: tl.constexpr, BHW: tl.constexpr, ACC: tl.constexpr,
    ):
        """y = relu((x - mean) * rstd * weight[c] + bias[c]) over one (image, group); its mean and rstd saved for
        the backward pass. Statistics in ACC (float32, or float64 for the parity tests), two passes over the
        registers (no cancellation from E[x^2] - E[x]^2)."""
        offsets, mask, channels = _group_tile(x, C, HW, CPG, BC, BHW)
        values = tl.load(x + offsets, mask=mask, other=0.0).to(ACC)
        count = CPG * HW
        average = tl.sum(tl.sum(values, axis=1), axis=0) / count
        centred = tl.where(mask, values - average, 0.0)
        inverse = 1.0 / tl.sqrt(tl.sum(tl.sum(centred * centred, axis=1), axis=0) / count + eps)
        scale = tl.load(weight + channels, mask=tl.arange(0, BC) < CPG, other=0.0).to(ACC)
        shift = tl.load(bias + channels, mask=tl.arange(0, BC) < CPG, other=0.0).to(ACC)
        out = tl.maximum(centred * inverse * scale[:, None] + shift[:, None], 0.0)
        tl.store(y + offsets, out.to(y.dtype.element_ty), mask=mask)
        row = tl.program_id(0)
        tl.store(mean + row, average)
        tl.store(rstd + row, inverse)

    @triton.jit
    def group_norm_relu_backward_kernel(
        dy, x, weight, bias, mean, rstd, dx, dweight, dbias, C, HW,
        CPG: tl.constexpr, BC: tl.constexpr, BHW: tl.constexpr, ACC: tl.constexpr,
        WEIGHT_GRADS: tl.constexpr, ATOMIC: tl.constexpr,
    ):
        """dx of one (image, group) from dy (the gradient of the ReLU's output), the ReLU's mask recomputed from x;
        with WEIGHT_GRADS also the group's channels' parts of dweight and dbias: added into zeroed (C,) outputs with
        ATOMIC, else stored as row n of (N, C) partial sums."""
        offsets, mask, channels = _group_tile(x, C, HW, CPG, BC, BHW)
        row = tl.program_id(0)
        average = tl.load(mean + row)
        inverse = tl.load(rstd + row)
        in_group = tl.arange(0, BC) < CPG
        scale = tl.load(weight + channels, mask=in_group, other=0.0).to(ACC)
        shift = tl.load(bias + channels, mask=in_group, other=0.0).to(ACC)
        normed = (tl.load(x + offsets, mask=mask, other=0.0).to(ACC) - average) * inverse
        grads = tl.load(dy + offsets, mask=mask, other=0.0).to(ACC)
        grads = tl.where(mask & (normed * scale[:, None] + shift[:, None] > 0), grads, 0.0)  # through the ReLU
        if WEIGHT_GRADS:
            per_channel_w = tl.sum(grads * normed, axis=1)
            per_channel_b = tl.sum(grads, axis=1)
            if ATOMIC:
                tl.atomic_add(dweight + channels, per_channel_w, mask=in_group, sem="relaxed")
                tl.atomic_add(dbias + channels, per_channel_b, mask=in_group, sem="relaxed")
            else:
                n = row // (C // CPG)
                tl.store(dweight + n * C + channels, per_channel_w, mask=in_group)
                tl.store(dbias + n * C + channels, per_channel_b, mask=in_group)
        dnormed = grads * scale[:, None]
        count = CPG * HW
        mean_d = tl.sum(tl.sum(dnormed, axis=1), axis=0) / count
        mean_dn = tl.sum(tl.sum(dnormed * normed, axis=1), axis=0) / count
        result = (dnormed - mean_d - normed * mean_dn) * inverse
        tl.store(dx + offsets, result.to(dx.dtype.element_ty), mask=mask)
