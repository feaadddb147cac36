"""The backends: one implementation of the op contract (docs/ops.md) per module: the compiled C++ ops' fake
kernels (cpp), pure PyTorch (pure_torch) and Triton (triton/). Chosen and prepared by pni_fast.ops."""
