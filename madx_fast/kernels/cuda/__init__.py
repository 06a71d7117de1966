"""CUDA C++ backend (csrc/): not built yet."""
raise ImportError("the CUDA C++ backend is not implemented yet; use backend='triton' or 'eager'")
