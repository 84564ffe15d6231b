"""The Triton kernels behind triton_conv.py: implicit-GEMM convolutions on NCHW tensors (forward, input gradient,
weight gradient, both gradients in one grid, the input gradient by sub-pixel classes). Device code only; the tilings,
the choice between these and cuDNN, and the torch ops are triton_conv.py's. Without triton installed this module
defines nothing but `triton = None`.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # torch wheels without triton: triton_conv falls back to torch's convolution
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _patch_offsets(pixels, taps, H, W, OH, OW, C, KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, M, K):
        """Offsets into x (B, C, H, W) and a validity mask of the (pixels, taps) tile of its im2col matrix:
        pixel m = (b, oh, ow) of the output, tap k = (c, kh, kw) of the kernel."""
        b = pixels // (OH * OW)
        rest = pixels % (OH * OW)
        ih = (rest // OW)[:, None] * STRIDE - PAD + ((taps % (KH * KW)) // KW)[None, :]
        iw = (rest % OW)[:, None] * STRIDE - PAD + (taps % KW)[None, :]
        c = taps // (KH * KW)
        valid = (pixels < M)[:, None] & (taps < K)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offsets = b[:, None] * (C * H * W) + c[None, :] * (H * W) + ih * W + iw
        return offsets, valid

    @triton.jit
    def _store_or_add(result, offsets, slab, acc, mask, ATOMIC: tl.constexpr):
        """A program's tile of sums: added in place into `result` (zeroed, 32- or 64-bit float) with ATOMIC, else
        stored at `slab` elements in (a split's own slab of partial sums, or the output itself)."""
        if ATOMIC:
            tl.atomic_add(result + offsets, acc, mask=mask, sem="relaxed")
        else:
            tl.store(result + slab + offsets, acc.to(result.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_split(out, partials, counters, offsets, split, slab, acc, mask, ATOMIC: tl.constexpr, ORDERED: tl.constexpr, SPLITS: tl.constexpr):
        """A program's tile of sums, split `split` of SPLITS: as _store_or_add, or with ORDERED into `partials` (one
        slab of `slab` elements per split), after which the last program of the tile to arrive (a counter per tile,
        which it resets) adds the SPLITS parts in split order into `out`: deterministic, and no zeroed output, at the
        price of one program reading SPLITS tiles at the end."""
        if ORDERED:
            tl.store(partials + split * slab + offsets, acc, mask=mask)
            tl.debug_barrier()  # every thread's part is written before the one atomic below releases them
            tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            arrived = tl.atomic_add(counters + tile, 1, sem="acq_rel")
            if arrived == SPLITS - 1:
                total = tl.zeros_like(acc)
                for part in tl.static_range(SPLITS):
                    total += tl.load(partials + part * slab + offsets, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out + offsets, total.to(out.dtype.element_ty), mask=mask)
                tl.atomic_xchg(counters + tile, 0)
        else:
            _store_or_add(out, offsets, split * slab, acc, mask, ATOMIC)

    @triton.jit
    def gathered_kernel(
        source, w, result, partials, counters, H, W, OH, OW, C, N, M, K,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STEPS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        ATOMIC: tl.constexpr, ORDERED: tl.constexpr, SPLITS: tl.constexpr, INPUT_GRAD: tl.constexpr,
    ):
        """Either gathered GEMM; split s of the taps (program axis 2, STEPS steps of BK each) stores its partial sum
        at result[s], or with ATOMIC adds it into result, or with ORDERED leaves it in `partials` for the tile's last
        program (_store_split).

        Forward (source x, result out): out[m, n] = sum_k patches[m, k] * w[n, k], stored at out (B, N, OH, OW).
        INPUT_GRAD (source dy, result dx): dx[b, c, ih, iw] = sum over (n, kh, kw) of dy[b, n, oh, ow] * w[n, c, kh, kw],
        where oh * STRIDE = ih + PAD - kh (and the same for columns): pixel m = (b, ih, iw) of the input, tap
        k = (n, kh, kw), channel = c. Taps whose output position is fractional or outside dy are masked out."""
        if INPUT_GRAD:
            _input_grad_tile(
                source, w, result, partials, counters, tl.program_id(0), tl.program_id(1), tl.program_id(2), H, W, OH, OW, C, N, M, K,
                KH, KW, STRIDE, PAD, BM, BN, BK, STEPS, PRECISION, ACC, ATOMIC, ORDERED, SPLITS,
            )
        else:
            pixels = tl.program_id(0) * BM + tl.arange(0, BM)
            channels = tl.program_id(1) * BN + tl.arange(0, BN)
            split = tl.program_id(2)
            acc = tl.zeros((BM, BN), dtype=ACC)
            for step in range(STEPS):  # a compile-time trip count (older interpreters cannot loop to a runtime bound)
                taps = (split * STEPS + step) * BK + tl.arange(0, BK)
                offsets, valid = _patch_offsets(pixels, taps, H, W, OH, OW, C, KH, KW, STRIDE, PAD, M, K)
                patches = tl.load(source + offsets, mask=valid, other=0.0)
                weights = tl.load(w + channels[None, :] * K + taps[:, None], mask=(taps < K)[:, None] & (channels < N)[None, :], other=0.0)
                acc = tl.dot(patches, weights, acc, input_precision=PRECISION, out_dtype=ACC)
            b = pixels // (OH * OW)
            rest = pixels % (OH * OW)
            target = b[:, None] * (N * OH * OW) + channels[None, :] * (OH * OW) + rest[:, None]
            mask = (pixels < M)[:, None] & (channels < N)[None, :]
            _store_split(result, partials, counters, target, split, M * N, acc, mask, ATOMIC, ORDERED, SPLITS)

    @triton.jit
    def _input_grad_tile(
        dy, w, dx, partials, counters, tile_m, tile_n, split, H, W, OH, OW, C, N, M, K,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STEPS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        ATOMIC: tl.constexpr, ORDERED: tl.constexpr, SPLITS: tl.constexpr,
    ):
        """gathered_kernel's input gradient for one (pixel tile, channel tile, split)."""
        pixels = tile_m * BM + tl.arange(0, BM)
        channels = tile_n * BN + tl.arange(0, BN)
        b = pixels // (H * W)
        rest = pixels % (H * W)
        acc = tl.zeros((BM, BN), dtype=ACC)
        for step in range(STEPS):  # a compile-time trip count (older interpreters cannot loop to a runtime bound)
            taps = (split * STEPS + step) * BK + tl.arange(0, BK)
            n = taps // (KH * KW)
            kernel_h = (taps % (KH * KW)) // KW
            kernel_w = taps % KW
            th = (rest // W)[:, None] + PAD - kernel_h[None, :]
            tw = (rest % W)[:, None] + PAD - kernel_w[None, :]
            th_safe = tl.where(th >= 0, th, 0)  # integer division truncates: keep it on non-negative numbers
            tw_safe = tl.where(tw >= 0, tw, 0)
            oh = th_safe // STRIDE
            ow = tw_safe // STRIDE
            valid = (th >= 0) & (tw >= 0) & (th_safe % STRIDE == 0) & (tw_safe % STRIDE == 0) & (oh < OH) & (ow < OW)
            valid = valid & (pixels < M)[:, None] & (taps < K)[None, :]
            grads = tl.load(dy + b[:, None] * (N * OH * OW) + n[None, :] * (OH * OW) + oh * OW + ow, mask=valid, other=0.0)
            weight_offsets = n[:, None] * (C * KH * KW) + channels[None, :] * (KH * KW) + (taps % (KH * KW))[:, None]
            weights = tl.load(w + weight_offsets, mask=(taps < K)[:, None] & (channels < C)[None, :], other=0.0)
            acc = tl.dot(grads, weights, acc, input_precision=PRECISION, out_dtype=ACC)
        target = b[:, None] * (C * H * W) + channels[None, :] * (H * W) + rest[:, None]
        _store_split(dx, partials, counters, target, split, M * C, acc, (pixels < M)[:, None] & (channels < C)[None, :], ATOMIC, ORDERED, SPLITS)

    @triton.jit
    def input_grad_subpixel_kernel(
        dy, w, dx, B, H, W, OH, OW, C, N,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STEPS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        TAPS_H: tl.constexpr, TAPS_W: tl.constexpr,
    ):
        """The input gradient of a strided convolution by sub-pixel classes (program axis 2): the input pixels with
        (ih + PAD) % STRIDE == rh (and rw for columns) only meet the kernel rows kh = rh, rh + STRIDE, ... So each
        class is a plain GEMM over N x TAPS_H x TAPS_W taps (TAPS_H = cdiv(KH, STRIDE); rows past KH masked), where
        the gathered implicit GEMM (gathered_kernel's INPUT_GRAD) steps through all N x KH x KW taps and masks 3 in 4 of
        them at stride 2. Program axis 0 covers the largest class; the others mask their last pixels."""
        cls = tl.program_id(2)
        rh = cls // STRIDE
        rw = cls % STRIDE
        first_h = ((rh - PAD) % STRIDE + STRIDE) % STRIDE  # the class's first input row and column
        first_w = ((rw - PAD) % STRIDE + STRIDE) % STRIDE
        rows = (H - first_h + STRIDE - 1) // STRIDE
        columns = (W - first_w + STRIDE - 1) // STRIDE
        pixels = tl.program_id(0) * BM + tl.arange(0, BM)
        channels = tl.program_id(1) * BN + tl.arange(0, BN)
        b = pixels // (rows * columns)
        i = (pixels // columns) % rows
        j = pixels % columns
        inside = pixels < B * rows * columns
        acc = tl.zeros((BM, BN), dtype=ACC)
        for step in range(STEPS):
            taps = step * BK + tl.arange(0, BK)
            n = taps // (TAPS_H * TAPS_W)
            a = (taps % (TAPS_H * TAPS_W)) // TAPS_W
            e = taps % TAPS_W
            kernel_h = rh + a * STRIDE
            kernel_w = rw + e * STRIDE
            tap_ok = (n < N) & (kernel_h < KH) & (kernel_w < KW)
            oh = (first_h + PAD - rh) // STRIDE + i[:, None] - a[None, :]
            ow = (first_w + PAD - rw) // STRIDE + j[:, None] - e[None, :]
            valid = inside[:, None] & tap_ok[None, :] & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
            grads = tl.load(dy + b[:, None] * (N * OH * OW) + n[None, :] * (OH * OW) + oh * OW + ow, mask=valid, other=0.0)
            weight_offsets = n[:, None] * (C * KH * KW) + channels[None, :] * (KH * KW) + (kernel_h * KW + kernel_w)[:, None]
            weights = tl.load(w + weight_offsets, mask=tap_ok[:, None] & (channels < C)[None, :], other=0.0)
            acc = tl.dot(grads, weights, acc, input_precision=PRECISION, out_dtype=ACC)
        ih = first_h + i * STRIDE
        iw = first_w + j * STRIDE
        target = dx + b[:, None] * (C * H * W) + channels[None, :] * (H * W) + (ih * W + iw)[:, None]
        tl.store(target, acc.to(dx.dtype.element_ty), mask=inside[:, None] & (channels < C)[None, :])

    @triton.jit
    def weight_grad_kernel(
        dy, x, partial, H, W, OH, OW, C, N, M, K,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STEPS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        ATOMIC: tl.constexpr,
    ):
        """partial[s, n, k] = sum over the pixels m of split s of dy[m, n] * patches[m, k]; the splits are summed
        afterwards (deterministic), or with ATOMIC added into partial[0] as they finish (in no fixed order)."""
        _weight_grad_tile(
            dy, x, partial, tl.program_id(0), tl.program_id(1), tl.program_id(2), H, W, OH, OW, C, N, M, K,
            KH, KW, STRIDE, PAD, BM, BN, BK, STEPS, PRECISION, ACC, ATOMIC,
        )

    @triton.jit
    def _weight_grad_tile(
        dy, x, partial, tile_n, tile_k, split, H, W, OH, OW, C, N, M, K,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STEPS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        ATOMIC: tl.constexpr,
    ):
        """weight_grad_kernel's work for one (channel tile, tap tile, split)."""
        channels = tile_n * BN + tl.arange(0, BN)
        taps = tile_k * BK + tl.arange(0, BK)
        acc = tl.zeros((BN, BK), dtype=ACC)
        for step in range(STEPS):  # STEPS * BM pixels per split
            pixels = split * (STEPS * BM) + step * BM + tl.arange(0, BM)
            offsets, valid = _patch_offsets(pixels, taps, H, W, OH, OW, C, KH, KW, STRIDE, PAD, M, K)
            patches = tl.load(x + offsets, mask=valid, other=0.0)
            b = pixels // (OH * OW)
            rest = pixels % (OH * OW)
            grads = tl.load(
                dy + b[None, :] * (N * OH * OW) + channels[:, None] * (OH * OW) + rest[None, :],
                mask=(pixels < M)[None, :] & (channels < N)[:, None], other=0.0,
            )
            acc = tl.dot(grads, patches, acc, input_precision=PRECISION, out_dtype=ACC)
        _store_or_add(partial, channels[:, None] * K + taps[None, :], split * (N * K), acc, (channels < N)[:, None] & (taps < K)[None, :], ATOMIC)


    @triton.jit
    def grads_kernel(
        dy, w, x, dx, dw, H, W, OH, OW, C, N, D_M, D_K, W_M, W_K, D_TILES_M, D_TILES_N, D_SPLITS, W_TILES_N, W_TILES_K,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        D_BM: tl.constexpr, D_BN: tl.constexpr, D_BK: tl.constexpr, D_STEPS: tl.constexpr, D_ATOMIC: tl.constexpr,
        W_BM: tl.constexpr, W_BN: tl.constexpr, W_BK: tl.constexpr, W_STEPS: tl.constexpr, W_ATOMIC: tl.constexpr,
        PRECISION: tl.constexpr, ACC: tl.constexpr,
    ):
        """Both gradients of one convolution in one launch: the first D_TILES_M x D_TILES_N x D_SPLITS programs
        compute input-gradient tiles, the rest weight-gradient tiles. Each alone leaves most of the GPU idle for
        a few dependent steps; side by side they fill it, with one launch instead of two."""
        pid = tl.program_id(0)
        input_programs = D_TILES_M * D_TILES_N * D_SPLITS
        if pid < input_programs:
            _input_grad_tile(
                dy, w, dx, dx, dx, pid % D_TILES_M, (pid // D_TILES_M) % D_TILES_N, pid // (D_TILES_M * D_TILES_N),
                H, W, OH, OW, C, N, D_M, D_K, KH, KW, STRIDE, PAD, D_BM, D_BN, D_BK, D_STEPS, PRECISION, ACC, D_ATOMIC, False, 1,
            )
        else:
            q = pid - input_programs
            _weight_grad_tile(
                dy, x, dw, q % W_TILES_N, (q // W_TILES_N) % W_TILES_K, q // (W_TILES_N * W_TILES_K),
                H, W, OH, OW, C, N, W_M, W_K, KH, KW, STRIDE, PAD, W_BM, W_BN, W_BK, W_STEPS, PRECISION, ACC, W_ATOMIC,
            )
