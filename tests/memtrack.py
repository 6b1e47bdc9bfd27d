"""Observe every tensor an op creates, in forward and backward (a TorchDispatchMode)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_elements(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes() // max(t.element_size(), 1)


class LargestTensor(TorchDispatchMode):
    """Records the largest freshly allocated op output (by element count) and the op that made it."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            # a view of an input allocates nothing; count only fresh storages
            fresh = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
            if fresh and _storage_elements(t) > self.numel:
                self.numel, self.op = _storage_elements(t), str(func)
        return out
