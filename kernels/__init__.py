"""fastres.kernels: the Triton kernels behind the `triton` backend of fastres.ops.

    conv      implicit-GEMM convolution (forward with BN-apply prologue and bias/scale/residual/ReLU/BN-statistics
              epilogues, input gradient, weight gradient)
    bn        BN statistics finalize, BN-apply + residual + ReLU, and BN + ReLU backward (elementwise kernels)
    autotune  tile configs, per-layer Triton-vs-ATen choice by measurement, and the on-disk cache

Without a GPU the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is imported).
"""
