"""The SM count that the split heuristics size their grids by (so that batch 1 still fills the GPU)."""

from __future__ import annotations

import functools

import torch

# Under TRITON_INTERPRET=1 kernels run on CPU tensors, one program after another: a small pretend count keeps
# grids small while still exercising the split paths.
INTERPRETER_SMS = 4


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sms(torch.cuda.current_device() if device.index is None else device.index)
