"""Attention kernels for the ViSpec draft layer (installed as `vispec_vllm.kernels`).

`paged_attention.TorchGatherAttention` is the reference backend (vectorised gather + SDPA; CPU and CUDA).
A GPU kernel plugs in through the `DraftAttentionBackend` protocol.
"""
