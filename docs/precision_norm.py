"""The row norm's error against float64 for the three ways of computing C = W Aᵀ on a bf16 weight (docs/precision.md)."""

import torch

import svdadapt
from svdadapt import norm

torch.manual_seed(0)
out_f, in_f, r = 1024, 4096, 16
lin = torch.nn.Linear(in_f, out_f).to(torch.bfloat16)
model = torch.nn.Sequential(lin)
layer = svdadapt.apply(model, svdadapt.AdapterConfig(method="dude", r=r, target_modules=["0"], svd_cache_dir=""))[0]
with torch.no_grad():  # a trained A and B: moved by 10% of their size
    layer.lora_A.add_(torch.randn_like(layer.lora_A) * layer.lora_A.std() * 0.1)
    layer.lora_B.add_(torch.randn_like(layer.lora_B) * layer.lora_B.std() * 0.1)
w64, a, b, s = layer.weight.double(), layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
n_ref = torch.linalg.vector_norm(w64 + s * b.double() @ a.double(), dim=1)


def err(c):
    n = norm.closed_form_norm(layer._w_sq.double(), c.double(), b.double(), b.double() @ (a.double() @ a.double().T), s)
    return ((n - n_ref).abs() / n_ref).max().item()


c_blocks = layer._weight_times_at(a)
c_bf16 = (layer.weight @ a.to(torch.bfloat16).T).float()  # a bf16 GEMM: A and C rounded to bf16
hi, lo, sc = norm.split_low_precision(a, torch.bfloat16)
c_split = layer.weight.double() @ hi.double().T + sc * (layer.weight.double() @ lo.double().T)  # the CUDA path's arithmetic
print(f"max relative error of n vs float64, dude {out_f}x{in_f} bf16 r={r}:")
print(f"  float32 row blocks (CPU path): {err(c_blocks):.1e}")
print(f"  split bf16 hi/lo, float32 output (CUDA path): {err(c_split.float()):.1e}")
print(f"  plain bf16 GEMM (A and C rounded to bf16): {err(c_bf16):.1e}")
