"""Math instruction data (MetaMathQA, GSM8K) as Alpaca-style prompts with the loss on the response only.

    rows = load_math("meta-math/MetaMathQA")                    # hub; fields query/response
    rows = load_math("../shared/data/gsm8k/train.jsonl")        # local; fields question/answer also accepted
    features = tokenize_math(rows[0], tokenizer, max_length=512)  # input_ids, labels (-100 on the prompt)

GSM8K answers end in "#### 72"; that line becomes "The answer is: 72", the form MetaMathQA responses
end in, so the same evaluation parses both.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# The Alpaca prompt without input (Taori et al. 2023), as MetaMathQA fine-tuning uses it.
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Response:\n"
)
FIELDS = (("query", "response"), ("question", "answer"))  # MetaMathQA, GSM8K
_GSM8K_ANSWER = re.compile(r"\n?#### *(.+?)\s*$")


def _rows_from_file(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (not text.lstrip().startswith("[")):
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n} is not valid JSON ({e}); expected one JSON object per line") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected a list of objects or JSON lines") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of objects, found {type(rows).__name__}")
    return rows


def _normalise(rows: list[dict], source: str) -> list[dict]:
    if not rows:
        raise ValueError(f"math data {source!r} has no rows")
    found = sorted(rows[0]) if isinstance(rows[0], dict) else type(rows[0]).__name__
    for q, a in FIELDS:
        if isinstance(rows[0], dict) and q in rows[0] and a in rows[0]:
            break
    else:
        expected = " or ".join(f"{q}/{a}" for q, a in FIELDS)
        raise ValueError(f"math data {source!r}: expected fields {expected}, found {found}")
    out = []
    for i, row in enumerate(rows):
        if q not in row or a not in row:
            raise ValueError(f"math data {source!r} row {i}: expected fields {q}/{a}, found {sorted(row)}")
        response = str(row[a])
        if q == "question":  # GSM8K: "#### 72" -> "The answer is: 72"
            response = _GSM8K_ANSWER.sub(lambda m: f"\nThe answer is: {m.group(1)}", response)
        out.append({"query": str(row[q]), "response": response})
    return out


def load_math(source: str, split: str = "train") -> list[dict]:
    """Rows {"query", "response"} from a local JSON/JSONL file (or a directory with `{split}.jsonl`) or a hub dataset.

    Accepts MetaMathQA's fields (query/response) or GSM8K's (question/answer); anything else is an
    error naming the fields expected and found.
    """
    path = Path(source)
    looks_local = path.suffix in (".json", ".jsonl") or source.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        path = path.expanduser()
        if path.is_dir():
            candidates = [path / f"{split}.jsonl", path / f"{split}.json"]
            path = next((c for c in candidates if c.is_file()), candidates[0])
        if not path.is_file():
            raise ValueError(
                f"math data file {str(path)!r} does not exist; pass a JSON/JSONL file or a hub id like meta-math/MetaMathQA"
            )
        return _normalise(_rows_from_file(path), str(path))
    import datasets

    ds = datasets.load_dataset(source, split=split)
    return _normalise(ds.to_list(), source)


def tokenize_math(row: dict, tokenizer, max_length: int) -> dict[str, list[int]]:
    """input_ids = prompt + response + EOS, truncated to max_length; labels are -100 on the prompt."""
    prompt = tokenizer(PROMPT.format(query=row["query"]), add_special_tokens=True)["input_ids"]
    response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    ids = (prompt + response)[:max_length]
    labels = ([-100] * len(prompt) + response)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class PadCollator:
    """Pad a batch on the right: input_ids with the pad id, attention_mask with 0, labels with -100."""

    def __init__(self, pad_token_id: int, multiple_of: int = 8):
        self.pad, self.multiple_of = pad_token_id, multiple_of

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        longest = max(len(b["input_ids"]) for b in batch)
        n = -(-longest // self.multiple_of) * self.multiple_of
        fill = {"input_ids": self.pad, "attention_mask": 0, "labels": -100}
        return {k: torch.tensor([b[k] + [v] * (n - len(b[k])) for b in batch]) for k, v in fill.items()}


__all__ = ["PROMPT", "PadCollator", "load_math", "tokenize_math"]
