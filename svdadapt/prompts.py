"""Prompt templates shared by training and evaluation, kept in one place.

The Alpaca instruction template is the one MetaMathQA-style fine-tuning (PiSSA, DuDe) trains with; the
`gsm8k_metamath` evaluation task formats its questions with the same function, so training and
evaluation cannot drift apart.
"""

from __future__ import annotations

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Response:"
)


def alpaca_prompt(query: str) -> str:
    """The Alpaca prompt for one instruction; the model's answer follows it directly.

    Args:
        query: the instruction, e.g. a GSM8K question.
    """
    return ALPACA_PROMPT.format(query=query)


__all__ = ["ALPACA_PROMPT", "alpaca_prompt"]
