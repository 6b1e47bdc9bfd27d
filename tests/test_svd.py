"""SVD: canonical signs, determinism, the cache, the randomized solver's error."""

import pytest
import torch

from svdadapt import svd as S
from svdadapt.svd import SVDSettings, truncated_svd


def decaying(out_f=300, in_f=200, decay=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out_f, in_f, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64)).Q
    s = decay ** torch.arange(in_f, dtype=torch.float64)
    return (u * s) @ v.T


@pytest.mark.parametrize("solver", ["full", "randomized"])
def test_bit_identical_twice_and_canonical_signs(solver):
    w = torch.randn(64, 48)
    cfg = SVDSettings(solver=solver, cache_dir="")
    a, b = truncated_svd(w, 8, cfg), truncated_svd(w.clone(), 8, cfg)
    for x, y in zip(a, b):
        assert x.equal(y)
    u = a[0]
    assert (u.gather(0, u.abs().argmax(0)[None]) > 0).all()  # largest entry of each left vector is positive


def test_full_solver_matches_linalg_svd_up_to_sign():
    w = torch.randn(50, 40, dtype=torch.float64)
    u, s, vh = truncated_svd(w, 6, SVDSettings(dtype="float64", cache_dir=""))
    u0, s0, vh0 = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(s, s0[:6], rtol=1e-12, atol=0)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, u0[:, :6] @ torch.diag(s0[:6]) @ vh0[:6], rtol=1e-10, atol=1e-12)


def test_float64_requested_whatever_the_weight_dtype():
    w = torch.randn(30, 20, dtype=torch.bfloat16)
    u, s, vh = truncated_svd(w, 4, SVDSettings(dtype="float64", cache_dir=""))
    assert u.dtype == s.dtype == vh.dtype == torch.float64


def test_cache_hit_and_rank_served_from_a_larger_decomposition(tmp_path, monkeypatch):
    calls = []
    real = S._compute
    monkeypatch.setattr(S, "_compute", lambda *a: calls.append(a[1]) or real(*a))
    w = torch.randn(64, 48)
    cfg = SVDSettings(cache_dir=str(tmp_path))
    big = truncated_svd(w, 16, cfg)
    again = truncated_svd(w, 16, cfg)
    small = truncated_svd(w, 4, cfg)
    assert calls == [16]  # computed once
    for x, y in zip(big, again):
        assert x.equal(y)
    calls.clear()
    fresh = truncated_svd(w, 4, SVDSettings(cache_dir=""))
    for x, y in zip(small, fresh):  # first r of a cached rank-16 full SVD == a fresh rank-r one
        assert x.equal(y)
    truncated_svd(w + 1, 4, cfg)  # different content: a miss
    truncated_svd(w, 4, SVDSettings(solver="randomized", cache_dir=str(tmp_path)))  # different solver: a miss
    assert calls == [4, 4, 4]  # the uncached fresh one, then two misses


def test_randomized_is_served_only_at_its_own_rank(tmp_path, monkeypatch):
    """A rank-k randomized decomposition truncated to r is not the rank-r one: never mix them."""
    calls = []
    real = S._compute
    monkeypatch.setattr(S, "_compute", lambda *a: calls.append(a[1]) or real(*a))
    w = torch.randn(64, 48)
    cfg = SVDSettings(solver="randomized", cache_dir=str(tmp_path))
    truncated_svd(w, 16, cfg)
    small = truncated_svd(w, 4, cfg)
    assert calls == [16, 4]
    for x, y in zip(small, truncated_svd(w, 4, SVDSettings(solver="randomized", cache_dir=""))):
        assert x.equal(y)


def test_damaged_cache_entry_is_recomputed(tmp_path):
    w = torch.randn(20, 16)
    cfg = SVDSettings(cache_dir=str(tmp_path))
    first = truncated_svd(w, 4, cfg)
    for f in tmp_path.rglob("*.safetensors"):
        f.write_bytes(b"garbage")
    for x, y in zip(first, truncated_svd(w, 4, cfg)):
        assert x.equal(y)


@pytest.mark.parametrize("decay", [0.9, 0.97])
def test_randomized_error_against_full_is_reported(decay):
    w = decaying(decay=decay)
    r = 16
    full = truncated_svd(w, r, SVDSettings(dtype="float64", cache_dir=""))
    rand = truncated_svd(w, r, SVDSettings(solver="randomized", dtype="float64", cache_dir=""))
    rec = [u @ torch.diag(s) @ vh for u, s, vh in (full, rand)]
    err = ((rec[1] - rec[0]).norm() / rec[0].norm()).item()
    print(f"randomized vs full SVD, top-{r} reconstruction, spectrum decay {decay}: relative error {err:.2e}")
    assert err < 1e-2


@pytest.mark.parametrize("decay", [0.9, 0.97])
def test_bf16_weight_sketched_in_bf16_stays_within_a_percent_of_full(decay, monkeypatch):
    """For a bfloat16 weight the power iterations multiply in bfloat16; the top-r reconstruction stays
    within 1% of the full SVD's of the same weight, and the products really ran in bfloat16."""
    w = decaying(600, 400, decay=decay).to(torch.bfloat16)
    r = 16
    full = truncated_svd(w, r, SVDSettings(cache_dir=""))
    seen = []
    real = S._orth
    monkeypatch.setattr(S, "_orth", lambda y: seen.append(y.dtype) or real(y))
    low = truncated_svd(w, r, SVDSettings(solver="randomized", cache_dir=""))
    exact = truncated_svd(w, r, SVDSettings(solver="randomized", sketch="dtype", cache_dir=""))
    assert seen and set(seen) == {torch.float32}  # bases are orthonormalised in float32 either way
    rec = [u @ torch.diag(s) @ vh for u, s, vh in (full, low, exact)]
    for got in rec[1:]:
        err = ((got - rec[0]).norm() / rec[0].norm()).item()
        print(f"bf16 weight, decay {decay}: top-{r} reconstruction error {err:.2e}")
        assert err < 1e-2
    assert not rec[1].equal(rec[2])  # the two precisions are different computations
    assert SVDSettings(solver="randomized").key() != SVDSettings(solver="randomized", sketch="dtype").key()


def test_unknown_sketch_precision():
    with pytest.raises(ValueError, match=r"svd sketch 'half' is not one of \('weight', 'dtype'\)"):
        truncated_svd(torch.randn(8, 6), 2, SVDSettings(solver="randomized", sketch="half", cache_dir=""))


def test_rank_out_of_range():
    with pytest.raises(ValueError, match=r"svd rank r=0 must be in \[1, 4\]"):
        truncated_svd(torch.randn(4, 6), 0, SVDSettings(cache_dir=""))


# --- fingerprint -------------------------------------------------------------------------------------

FP_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _flip(t: torch.Tensor, index: int, bit: int) -> torch.Tensor:
    """A copy of t with bit `bit` of element `index` (row-major) flipped, done on the raw bytes."""
    out = t.clone()
    raw = out.view(-1).view(torch.uint8)
    raw[index * t.element_size() + bit // 8] ^= 1 << (bit % 8)
    return out


def test_fingerprint_is_the_versioned_xxh3_128_of_shape_dtype_and_bytes():
    import xxhash

    w = torch.randn(5, 7, dtype=torch.bfloat16)
    want = xxhash.xxh3_128(b"(5, 7)|torch.bfloat16|" + w.view(torch.int16).numpy().tobytes()).hexdigest()
    assert S.fingerprint(w) == "v2-" + want


@pytest.mark.parametrize("dtype", FP_DTYPES)
def test_fingerprint_catches_every_single_bit_flip(dtype):
    """Every bit of an element (sign, exponent, mantissa), at the first, a middle and the last element."""
    w = torch.randn(9, 13).to(dtype)
    ref = S.fingerprint(w)
    seen = {ref}
    for index in (0, 9 * 13 // 2, 9 * 13 - 1):
        for bit in range(8 * w.element_size()):
            got = S.fingerprint(_flip(w, index, bit))
            assert got not in seen, (index, bit)
            seen.add(got)


def test_fingerprint_catches_swapped_rows_and_sees_layout_not_storage():
    w = torch.randn(16, 16, dtype=torch.bfloat16)
    swapped = w[[1, 0, *range(2, 16)]]
    assert S.fingerprint(swapped) != S.fingerprint(w)
    assert S.fingerprint(w.T) == S.fingerprint(w.T.contiguous()) != S.fingerprint(w)  # logical order, not memory
    assert S.fingerprint(w.reshape(8, 32)) != S.fingerprint(w)  # same bytes, another shape
    assert S.fingerprint(w.view(torch.float16)) != S.fingerprint(w)  # same bytes, another dtype
    assert S.fingerprint(w[:, ::2]) == S.fingerprint(w[:, ::2].contiguous())


def test_fingerprint_in_pieces_equals_in_one_go():
    """The block-at-a-time path (a non-contiguous or non-CPU weight), with pieces of one row and of 3 rows."""
    w = torch.randn(11, 6, 5, dtype=torch.float16)
    whole = S.fingerprint(w)
    odd = w.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not odd.is_contiguous()
    for piece in (1, 3 * 30 * 2, 1 << 20):
        assert S.fingerprint(odd, piece_bytes=piece) == whole
    assert S.fingerprint(torch.empty(0, 4)) != S.fingerprint(torch.empty(4, 0))


def test_legacy_fingerprints_still_verify():
    import hashlib

    w = torch.randn(6, 4)
    old = hashlib.sha256(b"(6, 4)|torch.float32|" + w.numpy().tobytes()).hexdigest()  # what version 1 wrote
    assert S.legacy_fingerprint(w) == old
    assert S.fingerprint_matches(w, old) and S.fingerprint_matches(w, S.fingerprint(w))
    assert not S.fingerprint_matches(_flip(w, 3, 0), old)
    assert not S.fingerprint_matches(_flip(w, 3, 0), S.fingerprint(w))
    with pytest.raises(ValueError, match="unknown version.*upgrade svdadapt"):
        S.fingerprint_matches(w, "v9-abc")


def test_one_thread_section_leaves_other_threads_alone():
    """svd._one_thread lowers the calling thread's count only, and restores it."""
    import threading

    from svdadapt import svd

    before = torch.get_num_threads()
    inside, release, seen = threading.Event(), threading.Event(), {}

    def factorise():
        with svd._one_thread():
            seen["inside"] = torch.get_num_threads()
            inside.set()
            release.wait(timeout=30)

    t = threading.Thread(target=factorise)
    t.start()
    inside.wait(timeout=30)
    seen["main"] = torch.get_num_threads()
    release.set()
    t.join()
    assert seen["main"] == before and torch.get_num_threads() == before
    if "OpenMP" in torch.__config__.parallel_info() and before > 1:
        assert seen["inside"] == 1


def test_auto_solver_is_full_up_to_1024_and_randomized_above():
    from svdadapt.svd import AUTO_FULL_MAX, solver_for

    assert AUTO_FULL_MAX == 1024 and SVDSettings().solver == "auto"
    assert [solver_for("auto", s) for s in [(1024, 4096), (4096, 1024), (1025, 4096)]] == ["full", "full", "randomized"]
    assert solver_for("full", (4096, 4096)) == "full" and solver_for("randomized", (8, 8)) == "randomized"
    gen = torch.Generator().manual_seed(0)
    for shape, solver in [((64, 48), "full"), ((1030, 1025), "randomized")]:
        w = torch.randn(*shape, generator=gen)
        auto = truncated_svd(w, 4, SVDSettings(cache_dir=""))
        same = truncated_svd(w, 4, SVDSettings(solver=solver, cache_dir=""))
        assert all(torch.equal(a, b) for a, b in zip(auto, same)), shape
