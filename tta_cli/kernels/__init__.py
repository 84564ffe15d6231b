"""Triton kernels: implicit-GEMM convolutions, fused GroupNorm + ReLU, and the zeroed outputs their atomic launches
write into. Only tta_cli/engine uses them."""
