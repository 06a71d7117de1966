// The CUDA kernels compiled as plain C++ for the CPU emulator (MADX_EMULATE, see cuda_emu.h).
#ifndef MADX_EMULATE
#error "compile with -DMADX_EMULATE"
#endif
#include "../bottleneck_mlp.cu"
