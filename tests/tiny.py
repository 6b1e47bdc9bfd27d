"""Tiny models built from configs (no hub), shared by the tests."""

import torch
from torch import nn

VOCAB = 128


class Custom(nn.Module):
    """A plain user module: linear layers with and without bias, a non-linear block."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 48)
        self.up = nn.Linear(48, 64)
        self.gate = nn.Linear(48, 64, bias=False)
        self.down = nn.Linear(64, 48)
        self.head = nn.Linear(48, 5)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))
        return self.head(h)


def llama_config(**overrides):
    """The tiny Llama's config (2 layers, hidden 64, 4 heads over 2 KV heads); keywords override it."""
    import transformers as tf

    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return tf.LlamaConfig(**{**base, **overrides})


def build(kind: str, seed: int = 0):
    """(model, adapter kwargs) for one tiny model kind."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    if kind == "llama":
        m = tf.LlamaForCausalLM(llama_config())
        return m, dict(target_modules="all-linear")
    if kind == "mistral":
        m = tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, max_position_embeddings=64, **common))
        return m, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if kind == "roberta":
        m = tf.RobertaForSequenceClassification(tf.RobertaConfig(max_position_embeddings=80, num_labels=3, **common))
        return m, dict(
            target_modules=["query", "value", "attention.output.dense", "output.dense"], modules_to_save=["classifier"]
        )
    if kind == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64))
        return m, dict(target_modules=["c_attn", "c_proj", "c_fc"])
    if kind == "custom":
        return Custom(), dict(target_modules=["up", "gate", "down"], modules_to_save=["head"])
    raise ValueError(kind)


def output(model, ids):
    out = model(input_ids=ids) if not isinstance(model, Custom) else model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def train_steps(model, ids, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = output(model, ids).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
