"""``tokred report``: one accuracy-versus-FLOPs table and plot from several lmms-eval runs of the tokred model.

Reads every ``*_results.json`` that ``lmms-eval --model tokred ... --output_path DIR`` wrote under the given
files or folders (searched recursively), takes each run's model and reducer spec from its
``config.model_args`` (``pretrained=`` and ``reducers=``) and the plugin's cost columns from its
``throughput`` section (:func:`tokred.integrations.lmms_eval_costs`), and writes ``report.md`` (one row per
run, task and metric: the score, the mean prefill FLOPs per request, the FLOPs ratio to the unreduced model,
the visual tokens that reach the language model's last layer) and ``report.png`` (per task, the score against
the FLOPs ratio, or the FLOPs where a run has no ratio, one point per run labelled by its spec) into ``--out``.
Runs of other lmms-eval models are listed with n/a costs.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokred.cli.tables import markdown
from tokred.integrations import lmms_eval_costs

COLUMNS = ("reducers", "task", "metric", "score", "prefill GFLOPs", "FLOPs ratio", "visual tokens", "requests",
           "model")


def add_arguments(parser) -> None:
    parser.add_argument("results", nargs="+", type=Path,
                        help="lmms-eval results files (*_results.json) or folders holding them (e.g. --output_path)")
    parser.add_argument("--out", type=Path, default=Path("results/report"), help="output directory")


def results_files(paths: list[Path]) -> list[Path]:
    """The ``*_results.json`` files of ``paths`` (files as given, folders searched recursively), in order."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.rglob("*_results.json"))
            if not found:
                raise FileNotFoundError(f"no lmms-eval results (*_results.json) under {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return list(dict.fromkeys(files))


def model_args(text: str) -> dict[str, str]:
    """lmms-eval's ``--model_args`` string as ``{key: value}`` (a reducer spec has no comma)."""
    return dict(part.strip().split("=", 1) for part in text.split(",") if "=" in part)


def rows(path: Path) -> list[dict]:
    """One dict per task and metric of the results file ``path``."""
    try:
        results = json.loads(path.read_text())
        config, scores, better = results["config"], results["results"], results.get("higher_is_better", {})
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not an lmms-eval results file ({type(error).__name__}: {error})") from None
    args = model_args(str(config.get("model_args") or ""))
    cost = lmms_eval_costs(results)
    out = []
    for task, values in scores.items():
        for metric in better.get(task) or {}:
            score = next((v for k, v in values.items() if k.partition(",")[0] == metric), None)
            if not isinstance(score, (int, float)):
                continue
            row = cost.get(task, {})
            out.append({"file": path, "model": args.get("pretrained", config.get("model")),
                        "reducers": args.get("reducers", "none") if config.get("model") == "tokred" else "n/a",
                        "task": task, "metric": metric, "score": score, "flops": row.get("prefill_flops_mean"),
                        "ratio": row.get("prefill_flops_ratio"), "visual": row.get("visual_tokens_mean"),
                        "requests": row.get("requests")})
    return out


def table(found: list[dict]) -> str:
    """The Markdown table of :func:`rows` results: by task and metric, then most FLOPs first."""
    ordered = sorted(found, key=lambda r: (r["task"], r["metric"], -(r["flops"] or 0.0), r["reducers"]))

    def number(value, digits, scale=1.0):
        return None if value is None else f"{value / scale:.{digits}f}"

    return markdown([(r["reducers"], r["task"], r["metric"], number(r["score"], 4), number(r["flops"], 4, 1e9),
                      number(r["ratio"], 3), number(r["visual"], 1), number(r["requests"], 0), r["model"])
                     for r in ordered], COLUMNS, align="lllrrrrrl")


def plot(found: list[dict], path: Path) -> None:
    """Per task and metric, the score against the FLOPs ratio (GFLOPs if a run has no ratio), one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["task"], r["metric"]) for r in found})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        points = [r for r in found if (r["task"], r["metric"]) == (task, metric) and r["flops"] is not None]
        by_ratio = all(r["ratio"] is not None for r in points)
        for r in points:
            x = r["ratio"] if by_ratio else r["flops"] / 1e9
            ax.scatter(x, r["score"], color="tab:blue")
            ax.annotate(r["reducers"], (x, r["score"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(title=task, xlabel="prefill FLOPs / unreduced" if by_ratio else "prefill GFLOPs per request",
               ylabel=metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(args) -> int:
    files = results_files(args.results)
    found = [row for path in files for row in rows(path)]
    if not found:
        raise ValueError(f"no scores in {len(files)} results file(s): {', '.join(map(str, files))}")
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(found)
    (args.out / "report.md").write_text(text + "\n")
    plot(found, args.out / "report.png")
    print(f"{len(files)} run(s): {', '.join(map(str, files))}\n\n{text}\n\nwrote {args.out / 'report.md'}, "
          f"{args.out / 'report.png'}")
    return 0
