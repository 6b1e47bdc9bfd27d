"""Workers for tests/test_faults.py: two processes that fill and read one SVD cache entry at the same time."""

from pathlib import Path

import torch


def weight() -> torch.Tensor:
    return torch.randn(384, 256, generator=torch.Generator().manual_seed(0))


def writer(cache: str, rounds: int, go) -> None:
    """Write the entry again and again (as many processes doing the same SVD would)."""
    from svdadapt import svd as S

    torch.set_num_threads(1)
    w = weight()
    u, s, vh = S.truncated_svd(w, 128, S.SVDSettings(cache_dir=""))
    folder = Path(cache) / "entry"
    go.wait()
    for _ in range(rounds):
        S._store(folder, 128, u, s, vh)


def reader(cache: str, rounds: int, go, result) -> None:
    """Read the entry (already there) while the writer rewrites it; count reads that failed or were wrong."""
    from svdadapt import svd as S

    torch.set_num_threads(1)
    w = weight()
    want = S.truncated_svd(w, 128, S.SVDSettings(cache_dir=""))
    folder = Path(cache) / "entry"
    go.wait()
    reads = missing = wrong = 0
    for _ in range(rounds):
        hit = S._lookup(folder, 128, exact=True)
        if hit is None:
            missing += 1  # the entry was there before: unreadable now means a partial one
            continue
        reads += 1
        wrong += not all(torch.equal(a, b) for a, b in zip(hit, want))
    result.put((reads, missing, wrong))
