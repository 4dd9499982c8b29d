"""Side-by-side results of downstream runs (COCO, LVIS, VOC), per initialisation.

Reads training output directories of tools/train_net.py: the numbers are those the evaluators
returned (``inference/<dataset>/evaluation.json``, written by
:class:`detectron2_ext.evaluation.SavedResultsEvaluator`), and the loss curves come from
detectron2's ``metrics.json``. Nothing is recomputed. Writes ``report.md`` (one table per dataset
and task), ``report.json``, ``loss_curves.png`` and, for LVIS, ``<dataset>_ap_by_frequency.png``.

An evaluation that is not the run's result (made before the end of its training, e.g. the
periodic one a killed run left; ``--eval-only`` of another checkpoint; or of unknown iteration,
from a file written before the iteration was recorded) is reported with a mark on its row and one
line saying which it is.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from detectron2_ext.evaluation import RESULTS_FILE, EvaluatedModel
from pretrain.errors import BadValueError, MissingInputError, OutputExistsError
from pretrain.files import write_json_atomic, write_text_atomic
from virtex_d2.reports import pretraining as pretraining_report
from virtex_d2.reports.plots import save_line_plot

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
FREQUENCY_METRICS = ("APr", "APc", "APf")
TASKS = {"bbox": "box", "segm": "mask"}
OUTPUT_FILES = ("report.md", "report.json", "loss_curves.png")
NOT_FINAL_MARK = "†"  # on the row of an evaluation that is not its run's result

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """One training output directory: its label, evaluations and training loss."""

    label: str
    directory: Path
    evaluations: dict  # dataset -> task -> metric -> value, as the evaluator returned them
    detections: dict = field(default_factory=dict)  # dataset -> detections made (where recorded)
    losses: list = field(default_factory=list)  # (iteration, total_loss)
    caveats: dict = field(default_factory=dict)  # dataset -> why its evaluation is not the run's result


def _init_name(directory: Path) -> str | None:
    config = directory / "config.yaml"
    if not config.is_file():
        return None
    return (yaml.safe_load(config.read_text()) or {}).get("VIRTEX", {}).get("INIT_NAME") or None


def _trained(evaluated: EvaluatedModel) -> str:
    """How many iterations the evaluated weights had trained, in words."""
    return "an unknown number of iterations" if evaluated.iteration is None else f"{evaluated.iteration} iterations"


def evaluation_caveat(record: dict) -> str | None:
    """Why an ``evaluation.json`` record is not its run's result at the end of training, in a
    sentence, or None when it is."""
    evaluated = EvaluatedModel.of_record(record)
    if evaluated is None:
        return ("evaluated at an unknown iteration (its evaluation.json is from before tools/train_net.py "
                "recorded it), so perhaps not at the end of training")
    if evaluated.at_end_of_training:
        return None
    if not evaluated.of_this_run:
        weights = evaluated.weights or "no weights (the model as initialised)"
        return f"evaluated with --eval-only on {weights}, not a checkpoint of this run ({_trained(evaluated)} of training)"
    source = "" if evaluated.weights is None else f"with --eval-only on its {evaluated.weights}, "
    return f"evaluated {source}after {_trained(evaluated)} of SOLVER.MAX_ITER {evaluated.max_iter}: not the end of training"


def read_run(directory, label: str | None = None) -> Run:
    """Read a run; its label is ``label``, else its config's VIRTEX.INIT_NAME, else its name."""
    directory = Path(directory)
    files = sorted(directory.glob(f"inference/*/{RESULTS_FILE}"))
    if not files:
        raise MissingInputError(f"{directory}: no inference/*/{RESULTS_FILE}; has tools/train_net.py evaluated it?")
    evaluations, detections, caveats = {}, {}, {}
    for path in files:
        record = json.loads(path.read_text())
        evaluations[record["dataset"]] = record["results"]
        if "detections" in record:  # files written before it was recorded have none
            detections[record["dataset"]] = record["detections"]
        caveat = evaluation_caveat(record)
        if caveat is not None:
            caveats[record["dataset"]] = caveat
    return Run(label or _init_name(directory) or directory.name, directory, evaluations,
               losses=read_losses(directory / "metrics.json"), detections=detections, caveats=caveats)


def read_losses(metrics: Path) -> list[tuple[int, float]]:
    """``(iteration, total_loss)`` of detectron2's ``metrics.json``, by iteration; [] without one.

    Why not line by line as written: detectron2 appends a line per logged iteration, so a run
    killed mid-write leaves a cut line (which ``--resume`` then continues after), and a resumed
    run logs the iterations after its checkpoint again. A line that is not JSON is skipped with
    a warning naming the file and line; of an iteration logged twice the later entry counts (the
    training that the run's weights went on from).
    """
    if not metrics.is_file():
        return []
    losses: dict[int, float] = {}
    for number, line in enumerate(metrics.read_text().splitlines(), start=1):
        try:
            entry = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
            logger.warning("%s: line %d is not JSON (cut short when the run was stopped?); its loss is left out of "
                           "the curve", metrics, number)
            continue
        if isinstance(entry, dict) and "total_loss" in entry:
            losses[entry["iteration"]] = entry["total_loss"]
    return sorted(losses.items())


def _value(value):
    """JSON-safe metric: NaN (the evaluators' "not computable") becomes None."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def build_report(runs) -> dict:
    """``{"datasets": {dataset: {task: {label: {metric: value}}}}, "runs": {...}}``."""
    datasets, seen = {}, set()
    for run in runs:
        for dataset, results in run.evaluations.items():
            if (run.label, dataset) in seen:
                raise BadValueError(f"two runs labelled '{run.label}' evaluate {dataset}; label them LABEL=DIR")
            seen.add((run.label, dataset))
            for task, metrics in results.items():
                if task in TASKS:
                    row = {m: _value(metrics[m]) for m in METRICS if m in metrics}
                    datasets.setdefault(dataset, {}).setdefault(TASKS[task], {})[run.label] = row
    return {
        "datasets": datasets,
        "runs": {run.label: {"directory": str(run.directory), "datasets": sorted(run.evaluations),
                             "detections": run.detections, "caveats": run.caveats} for run in runs},
    }


def _defined(value) -> bool:
    """False for the evaluators' "not computable" values: None (NaN) and LVIS's -100."""
    return value is not None and value >= 0


def to_markdown(report: dict) -> str:
    """One table per dataset and task: a row per initialisation, a column per metric."""
    lines = ["# Downstream results", ""]
    for dataset, tasks in report["datasets"].items():
        for task, rows in tasks.items():
            columns = [m for m in METRICS if any(m in row for row in rows.values())]
            lines += [f"## {dataset}: {task} AP", "", "| init | " + " | ".join(columns) + " |",
                      "|---|" + "---:|" * len(columns)]
            for label, row in rows.items():
                cells = [f"{row[m]:.1f}" if _defined(row.get(m)) else "–" for m in columns]
                mark = f" {NOT_FINAL_MARK}" if dataset in report["runs"][label]["caveats"] else ""
                lines.append(f"| {label}{mark} | " + " | ".join(cells) + " |")
            lines.append("")
    lines.append("Numbers are the evaluators' own output, AP in percent. –: not computable (no ground truth "
                 "in that group; COCO's evaluator returns NaN, LVIS's -100).")
    for label, run in report["runs"].items():
        for dataset, caveat in run["caveats"].items():
            lines.append(f"\n{NOT_FINAL_MARK} **{label}** on {dataset}: {caveat}.")
        for dataset, count in run["detections"].items():
            if count == 0:
                lines.append(f"\n**{label} made no detections on {dataset}** (none scored above "
                             "MODEL.ROI_HEADS.SCORE_THRESH_TEST): its AP is undefined, not low, and the "
                             "evaluator leaves out the tasks it could not score.")
    return "\n".join(lines) + "\n"


def plot_ap_by_frequency(tasks: dict, title: str, path: Path) -> None:
    """Grouped bars of APr/APc/APf per initialisation, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, (task, rows) in zip(axes[0], tasks.items()):
        width = 0.8 / max(1, len(rows))
        for i, (label, row) in enumerate(rows.items()):
            values = [row[m] if _defined(row.get(m)) else math.nan for m in FREQUENCY_METRICS]
            ax.bar([g + i * width for g in range(len(FREQUENCY_METRICS))], values, width, label=label)
        ax.set_xticks([g + width * (len(rows) - 1) / 2 for g in range(len(FREQUENCY_METRICS))])
        ax.set_xticklabels(["rare", "common", "frequent"])
        defined = [row[m] for row in rows.values() for m in FREQUENCY_METRICS if _defined(row.get(m))]
        ax.set_ylim(0, max([1.0, *defined]) * 1.15)
        ax.set_ylabel(f"{task} AP")
        ax.set_title(f"{title}: {task} AP by frequency group")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_losses(runs, path: Path) -> None:
    """Total training loss against iteration, one line per run."""
    lines = [(f"{run.label} ({', '.join(sorted(run.evaluations))})", *zip(*run.losses), "o") for run in runs if run.losses]
    save_line_plot(lines, path, "Training loss", "iteration", "total loss")


def write_report(runs, output_dir, force: bool = False, pretraining=None) -> list:
    """Write the report files into ``output_dir``; returns their paths.

    ``pretraining``: an optional :class:`~virtex_d2.reports.pretraining.PretrainingSummary`
    whose loss curve and example captions are appended to the report.
    """
    output_dir = Path(output_dir)
    report = build_report(runs)
    frequency_plots = {f"{dataset}_ap_by_frequency.png": (dataset, tasks) for dataset, tasks in report["datasets"].items()
                       if any(m in row for rows in tasks.values() for row in rows.values() for m in FREQUENCY_METRICS)}
    pretraining_files = (pretraining_report.CURVES_FILE,) if pretraining is not None else ()
    paths = [output_dir / name for name in (*OUTPUT_FILES, *frequency_plots, *pretraining_files)]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise OutputExistsError(f"report files exist ({', '.join(existing)}); pass --force to overwrite them")
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(report)
    if pretraining is not None:
        markdown += "\n" + pretraining_report.to_markdown(pretraining, output_dir)
        pretraining_report.write_pretraining_files(pretraining, output_dir)
    write_text_atomic(output_dir / "report.md", markdown)
    write_json_atomic(output_dir / "report.json", report, allow_nan=False)
    plot_losses(runs, output_dir / "loss_curves.png")
    for name, (dataset, tasks) in frequency_plots.items():
        plot_ap_by_frequency(tasks, dataset, output_dir / name)
    return paths
