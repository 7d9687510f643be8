"""GPU kernels that ``animevq.nn`` modules can use when they run on CUDA (Triton)."""
