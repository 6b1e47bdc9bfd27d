"""Workers for tests/test_faults.py: two processes that fill and read one SVD cache entry at the same time."""

from pathlib import Path

import torch


def factors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rank-128 entry's U, S, Vh: seeded values, the same bits in every process at any thread count."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(2048, 128, generator=g), torch.rand(128, generator=g), torch.randn(128, 2048, generator=g)


def _slow_save_file(tensors: dict, path: str) -> None:
    """safetensors' save_file as a slow disk does it: half the bytes, a pause, the rest."""
    import time

    from safetensors.torch import save

    data = save(tensors)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(0.002)
        f.write(data[len(data) // 2 :])


def writer(cache: str, rounds: int, go, done) -> None:
    """Write the entry again and again (as many processes doing the same SVD would), on a slow disk."""
    from svdadapt import svd as S

    S.save_file = _slow_save_file
    folder, entry = Path(cache) / "entry", factors()
    go.wait()
    for _ in range(rounds):
        S._store(folder, 128, *entry)
    done.set()


def reader(cache: str, go, done, result) -> None:
    """Read the entry (already there) until the writer is done; count reads that failed or were wrong."""
    from svdadapt import svd as S

    folder, want = Path(cache) / "entry", factors()
    go.wait()
    reads = missing = wrong = 0
    while not done.is_set() or reads + missing == 0:
        hit = S._lookup(folder, 128, exact=True)
        if hit is None:
            missing += 1  # the entry was there before: unreadable now means a partial one
            continue
        reads += 1
        wrong += not all(torch.equal(a, b) for a, b in zip(hit, want))
    result.put((reads, missing, wrong))
