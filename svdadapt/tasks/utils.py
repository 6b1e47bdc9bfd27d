"""Python helpers the local lm-eval task YAMLs call (`!function svdadapt.tasks.utils.NAME`).

- `load_mmlu`: one MMLU subject from the local CSVs (`question,choice0..3,answer`, answer 0-3).
- `metamath_prompt`, `gsm8k_label`, `extract_metamath_answer`, `metamath_process_results`: the
  MetaMathQA-style GSM8K scorer (zero-shot Alpaca prompt, the number after "The answer is:").
"""

from __future__ import annotations

import csv
import re
from fractions import Fraction
from pathlib import Path

from svdadapt.prompts import alpaca_prompt

MMLU_COLUMNS = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
# the first number after the marker: optional sign, digits, one optional separator (".", "," or "/"), digits
_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")
_MARKER = re.compile(r"The answer is:\s*")


def read_mmlu_csv(path: str | Path) -> list[dict]:
    """Rows of one local MMLU CSV as `{"question", "choices": [4 str], "answer": int}`.

    Read with the `csv` module, so choices such as "None" or "4" stay strings.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"MMLU file {str(path)!r} does not exist; pass --data-dir DIR with DIR/mmlu/{{dev,test}}/<subject>_{{dev,test}}.csv"
        )
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != MMLU_COLUMNS:
            raise ValueError(f"{path}: header is {reader.fieldnames}, expected {','.join(MMLU_COLUMNS)}")
        rows = []
        for i, row in enumerate(reader, start=2):
            answer = row["answer"].strip()
            if answer not in ("0", "1", "2", "3"):
                raise ValueError(f"{path}:{i}: answer {answer!r} is not an integer 0-3")
            rows.append({"question": row["question"], "choices": [row[f"choice{k}"] for k in range(4)], "answer": int(answer)})
    return rows


def load_mmlu(data_files: dict[str, str] | None = None, **_ignored):
    """A `datasets.DatasetDict` with one split per entry of `data_files` (lm-eval's `custom_dataset` hook)."""
    import datasets

    if not data_files:
        raise ValueError("the MMLU task needs dataset_kwargs.data_files {dev: CSV, test: CSV}; regenerate the task directory")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_mmlu_csv(p)) for split, p in data_files.items()})


def metamath_prompt(doc: dict) -> str:
    """The zero-shot prompt of the `gsm8k_metamath` task: the training template around the question."""
    return alpaca_prompt(doc["question"])


def gsm8k_label(doc: dict) -> str:
    """The reference number of a GSM8K solution: what follows "####", thousands separators removed."""
    return doc["answer"].split("####")[-1].strip().replace(",", "")


def extract_metamath_answer(text: str) -> int | None:
    """The number after the last "The answer is:" in a completion, rounded to an integer; None if absent.

    Follows the MetaMathQA GSM8K scorer: the first number after the marker, thousands separators
    dropped, a fraction "a/b" evaluated (a/0 gives a), the result rounded to the nearest integer.
    """
    parts = _MARKER.split(text)
    if len(parts) < 2:
        return None
    match = _NUMBER.search(parts[-1])
    return None if match is None else _as_integer(match.group())


def extract_last_number(text: str) -> int | None:
    """The last number anywhere in a completion, read as `extract_metamath_answer` reads one; None if
    there is none. A lenient second score for models that do not (yet) write "The answer is:"."""
    numbers = _NUMBER.findall(text)
    return _as_integer(numbers[-1]) if numbers else None


def _as_integer(token: str) -> int | None:
    token = token.replace(",", "")
    try:
        if "/" in token:
            num, den = token.split("/")
            value = float(num) if float(den) == 0 else float(Fraction(int(num), int(den)))
        else:
            value = float(token)
    except (ValueError, OverflowError):
        return None
    if value in (float("inf"), float("-inf")):
        return None
    return round(value)


def metamath_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """`exact_match` = 1 when the number after "The answer is:" equals the reference, else 0 (the
    papers' score); `last_number_match` = 1 when the completion's last number does (lenient)."""
    try:
        label = float(gsm8k_label(doc))
    except ValueError:
        return {"exact_match": 0.0, "last_number_match": 0.0}
    preds = {"exact_match": extract_metamath_answer(results[0]), "last_number_match": extract_last_number(results[0])}
    return {name: float(pred is not None and float(pred) == label) for name, pred in preds.items()}
