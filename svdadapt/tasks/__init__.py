"""lm-eval task definitions that read local copies of GSM8K and MMLU instead of the hub.

    from svdadapt.tasks import write_task_dir
    names = write_task_dir("../shared/data", "/tmp/tasks")   # then TaskManager(include_path="/tmp/tasks")

The YAML templates next to this file carry a `@DATA_DIR@` placeholder; `write_task_dir` fills it in
and writes one YAML per MMLU subject plus the `mmlu` group and its four category groups, so the task
names, prompts, few-shot settings and metrics match lm-eval's official `gsm8k` and `mmlu`.
Expected data layout (see docs/evaluation.md):

    DATA_DIR/gsm8k/{train,test}.jsonl
    DATA_DIR/mmlu/{dev,test}/<subject>_{dev,test}.csv
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

TEMPLATES = Path(__file__).parent
CATEGORIES = ("stem", "other", "social_sciences", "humanities")
_BY_CATEGORY = {
    "stem": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science college_mathematics "
        "college_physics computer_security conceptual_physics electrical_engineering elementary_mathematics high_school_biology "
        "high_school_chemistry high_school_computer_science high_school_mathematics high_school_physics high_school_statistics "
        "machine_learning"
    ),
    "other": (
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing medical_genetics "
        "miscellaneous nutrition professional_accounting professional_medicine virology"
    ),
    "social_sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology public_relations "
        "security_studies sociology us_foreign_policy"
    ),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history international_law "
        "jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory professional_law world_religions"
    ),
}
#: subject -> category, the 57 MMLU subjects
MMLU_SUBJECTS: dict[str, str] = {s: c for c, names in _BY_CATEGORY.items() for s in names.split()}
GSM8K_TASKS = ("gsm8k", "gsm8k_metamath")
MMLU_GROUPS = ("mmlu", *(f"mmlu_{c}" for c in CATEGORIES))


def local_task_names() -> list[str]:
    """Every task and group name `write_task_dir` defines."""
    return [*GSM8K_TASKS, *MMLU_GROUPS, *(f"mmlu_{s}" for s in MMLU_SUBJECTS)]


def _quoted(path: Path) -> str:
    """`path` escaped for a YAML double-quoted string (JSON escapes are valid there)."""
    return json.dumps(str(path))[1:-1]


def _fill(template: str, **values: str) -> str:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        raise ValueError(
            f"{what}: {str(path)!r} does not exist; --data-dir must hold gsm8k/{{train,test}}.jsonl and mmlu/{{dev,test}}/*.csv"
        )


def write_task_dir(data_dir: str | os.PathLike, out_dir: str | os.PathLike, tasks: list[str] | None = None) -> list[str]:
    """Write the local task YAMLs into `out_dir` with paths under `data_dir`; returns the task names.

    Args:
        data_dir: holds `gsm8k/` and `mmlu/` (either may be absent if not needed).
        out_dir: a directory to pass to lm-eval as `include_path`; created if missing.
        tasks: names about to be evaluated; their data files are checked now, so a missing file
            fails before any model is loaded. None checks nothing.
    """
    data, out = Path(data_dir).expanduser().resolve(), Path(out_dir)
    if not data.is_dir():
        raise ValueError(f"--data-dir {str(data_dir)!r} is not a directory; pass the folder holding gsm8k/ and mmlu/")
    out.mkdir(parents=True, exist_ok=True)
    root = _quoted(data)
    for name in GSM8K_TASKS:
        (out / f"{name}.yaml").write_text(_fill(f"{name}.yaml", DATA_DIR=root))
    for subject, category in MMLU_SUBJECTS.items():
        text = _fill(
            "mmlu_subject.yaml", SUBJECT=subject, SUBJECT_NAME=subject.replace("_", " "), CATEGORY=category, DATA_DIR=root
        )
        (out / f"mmlu_{subject}.yaml").write_text(text)
    acc = [{"metric": "acc", "weight_by_size": True}]  # group score: mean over all questions, as lm-eval's mmlu
    groups = {"mmlu": {"group": "mmlu", "task": [f"mmlu_{c}" for c in CATEGORIES]}}
    for c in CATEGORIES:
        groups[f"mmlu_{c}"] = {"group": f"mmlu_{c}", "group_alias": c, "task": [f"mmlu_{c}_tasks"]}
    for name, spec in groups.items():
        spec = {**spec, "aggregate_metric_list": acc, "metadata": {"version": 2}}
        (out / f"_group_{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    for name in tasks or ():
        if name in GSM8K_TASKS:
            for split in ("train", "test") if name == "gsm8k" else ("test",):
                _require(data / "gsm8k" / f"{split}.jsonl", f"task {name}")
        for subject in expand_mmlu(name):
            for split in ("dev", "test"):
                _require(data / "mmlu" / split / f"{subject}_{split}.csv", f"task mmlu_{subject}")
    return local_task_names()


def expand_mmlu(name: str) -> list[str]:
    """The MMLU subjects a task or group name covers (empty for other names)."""
    if name == "mmlu":
        return list(MMLU_SUBJECTS)
    if name.startswith("mmlu_") and name[5:] in CATEGORIES:
        return [s for s, c in MMLU_SUBJECTS.items() if c == name[5:]]
    return [name[5:]] if name.startswith("mmlu_") and name[5:] in MMLU_SUBJECTS else []


__all__ = ["MMLU_SUBJECTS", "CATEGORIES", "local_task_names", "write_task_dir", "expand_mmlu"]
