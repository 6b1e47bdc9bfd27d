"""Observe every tensor an op creates, in forward and backward (a TorchDispatchMode)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LargestTensor(TorchDispatchMode):
    """Records the largest op output (by element count) and which op made it."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            # views share storage and allocate nothing; count only fresh storages
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() // max(t.element_size(), 1) > self.numel:
                if not any(
                    isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                    for a in tree_flatten((args, kwargs))[0]
                ):
                    self.numel, self.op = t.untyped_storage().nbytes() // t.element_size(), str(func)
        return out
