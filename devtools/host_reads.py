"""Count tensor -> Python reads (each one a host-device synchronisation on a GPU)."""

import torch
from torch.overrides import TorchFunctionMode


class HostReadCounter(TorchFunctionMode):
    READS = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
             torch.Tensor.tolist}

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads += 1
        return func(*args, **(kwargs or {}))
