"""Compute kernels for sloth-serve. Each operation has a plain-PyTorch reference (`*_ref`) and a
dispatching entry point; Triton versions are chosen on CUDA where they exist."""
