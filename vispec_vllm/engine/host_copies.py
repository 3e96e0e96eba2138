"""Host-to-device copies that never stall the device stream.

A copy from ordinary (pageable) host memory makes CUDA stage it synchronously, which waits for the stream and
cancels vLLM's async scheduling. Every host table the proposer sends to the device goes through
`host_to_device`: pinned memory (where the platform has it) and a non-blocking copy.
"""

from __future__ import annotations

import torch
from vllm.utils.platform_utils import is_pin_memory_available


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One non-blocking copy of a host tensor to `device` (the tensor itself when `device` is the host)."""
    if host.device == device:
        return host
    if is_pin_memory_available() and not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
