"""`torch.compile` of a wrapped model: dynamo traces the adapter layer without a graph break, and the
compiled forward and backward equal eager's."""

import pytest
import torch

import svdadapt

transformers = pytest.importorskip("transformers")

METHODS = ["lora", "dora", "pissa", "dude", "loraxs", "edora"]
PACKAGE = svdadapt.__file__.rsplit("/", 1)[0]


def wrapped_llama(method):
    from tiny import VOCAB, llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(num_hidden_layers=1))
    svdadapt.apply(model, svdadapt.AdapterConfig(method=method, r=4, svd_cache_dir=""))
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, ids


@pytest.mark.parametrize("method", METHODS)
def test_dynamo_finds_no_graph_break_in_svdadapt(method):
    model, ids = wrapped_llama(method)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(ids)
    ours = [
        f"{frame.filename}:{frame.lineno}: {b.reason.splitlines()[0]}"
        for b in explained.break_reasons
        for frame in b.user_stack
        if frame.filename.startswith(PACKAGE)
    ]
    assert not ours, f"{len(ours)} graph breaks in svdadapt: {ours[:3]}"


@pytest.mark.parametrize("method", ["dora", "dude", "edora"])
def test_compiled_step_equals_eager(method):
    """aot_eager traces forward and backward through the step as inductor would, without code generation."""
    model, ids = wrapped_llama(method)
    trained = [p for p in model.parameters() if p.requires_grad]

    def step(ids):
        return model(input_ids=ids, labels=ids).loss

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    loss = compiled(ids)
    loss.backward()
    grads = [p.grad.clone() for p in trained]
    model.zero_grad()
    eager = step(ids)
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-7)
    for p, g in zip(trained, grads, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
