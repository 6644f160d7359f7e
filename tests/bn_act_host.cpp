// The CUDA backend's source compiled by the host C++ compiler, its kernels run on CPU tensors by
// csrc/host_emulation.h. Built by tests/host_emulation.py for tests/test_cuda_backend.py.
#define FUSEDRES_HOST_EMULATION
#include "bn_act.cu"
