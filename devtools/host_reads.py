"""Count calls of chosen torch functions: tensor -> Python reads (each one a host-device synchronisation on a GPU),
or any other function a test wants to see called."""

from typing import Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode


class TorchCallCounter(TorchFunctionMode):
    """While active, counts the calls of ``functions`` in ``calls``."""

    def __init__(self, functions: Iterable[Callable]):
        super().__init__()
        self.functions = frozenset(functions)
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.functions:
            self.calls += 1
        return func(*args, **(kwargs or {}))


HOST_READS = (torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
              torch.Tensor.tolist)


class HostReadCounter(TorchCallCounter):
    def __init__(self):
        super().__init__(HOST_READS)

    @property
    def reads(self) -> int:
        return self.calls
