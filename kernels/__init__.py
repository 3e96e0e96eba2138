"""Attention pieces for the ViSpec draft layer (installed as `vispec_vllm.kernels`).

`dropped_keys.FlaggedHeads` hides dropped image keys from vLLM's own paged attention kernels (CPU and CUDA)
with one spare coordinate per head, so the draft runs on whatever attention backend the platform picked;
`dropped_keys.dropped_block_order` takes whole dropped blocks out of the block table the kernel reads.
"""
