"""How a method is made fast: flat parameters, CUDA graphs, compile with fallback, per-sample weights,
pipelining and overlap. Methods call it; only this package touches the Triton kernels (tta_cli/kernels)."""
