"""The pretraining side of a report: loss curves from TensorBoard and example captions.

Reads what the pretraining run and tools/caption.py wrote (the run's ``tensorboard/`` events,
a captions JSON) and what the dataset holds (COCO captions annotations), so that a report can
show how pretraining went and what the model says next to what people wrote. Nothing is
recomputed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.data.dataset_root import load_json
from pretrain.errors import BadValueError, MissingInputError
from virtex_d2.reports.plots import save_line_plot

CURVES_FILE = "pretraining_loss.png"


@dataclass
class CaptionExample:
    """A generated caption beside the image's reference captions."""

    image: str
    generated: str
    references: list


@dataclass
class PretrainingSummary:
    """Scalar curves of one pretraining run (``tag -> [(iteration, value)]``), caption examples,
    and optionally tools/eval_captioning.py's output (``caption_eval``) and the folder of
    tools/visualize_attention.py's maps (``attention``)."""

    directory: Path
    curves: dict
    examples: list = field(default_factory=list)
    caption_eval: dict | None = None
    attention: Path | None = None


def _read_tool_json(path, tool: str, what: str):
    """The JSON a tool wrote at ``path``; a missing or unparsable file is named with the tool."""
    if not Path(path).is_file():
        raise MissingInputError(f"{path}: {what} not found ({tool} writes it)")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadValueError(f"{path}: not a JSON file ({err})") from None


def read_caption_eval(path) -> dict:
    """tools/eval_captioning.py's output JSON; errors name the file."""
    data = _read_tool_json(path, "tools/eval_captioning.py --output", "caption evaluation")
    if not isinstance(data, dict) or not isinstance(data.get("scores"), dict):
        raise BadValueError(f"{path}: expected tools/eval_captioning.py's output (a 'scores' object)")
    return data


def read_curves(run_dir) -> dict:
    """The ``loss/*`` and ``val/*`` scalars of a pretraining run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = Path(run_dir) / "tensorboard"
    if not any(events.glob("events.out.tfevents.*")):
        raise MissingInputError(f"{events}: no TensorBoard events; is {run_dir} a tools/pretrain.py output directory?")
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
        if tag.startswith(("loss/", "val/"))
    }


def _read_caption_list(path) -> list:
    """tools/caption.py's output: a JSON list of ``{"image", "caption"}``; errors name the file."""
    items = _read_tool_json(path, "tools/caption.py", "captions file")
    if not isinstance(items, list) or not all(isinstance(i, dict) and {"image", "caption"} <= i.keys() for i in items):
        raise BadValueError(f"{path}: expected tools/caption.py's list of {{\"image\", \"caption\"}} entries")
    return items


def read_caption_examples(captions_file, references_file, limit: int) -> list:
    """The first ``limit`` generated captions of ``captions_file`` (tools/caption.py output) with
    the reference captions of the same image files in a COCO captions JSON."""
    generated = _read_caption_list(captions_file)
    coco = load_json(references_file)  # names the file when it is missing or malformed
    file_of_id = {image["id"]: image["file_name"] for image in coco["images"]}
    references: dict[str, list] = {}
    for annotation in coco["annotations"]:
        references.setdefault(file_of_id[annotation["image_id"]], []).append(annotation["caption"].strip())
    missing = [item["image"] for item in generated if item["image"] not in references]
    if missing:
        raise BadValueError(f"{references_file}: no reference captions for {', '.join(missing[:3])} "
                            f"(from {captions_file}); are they from the same split?")
    return [CaptionExample(item["image"], item["caption"], references[item["image"]]) for item in generated[:limit]]


def plot_curves(curves: dict, path: Path) -> None:
    """Training losses (and validation loss) against iteration."""
    lines = [(tag, *zip(*points), "o" if tag.startswith("val/") else None)
             for tag, points in sorted(curves.items()) if tag.startswith("loss/") or tag == "val/loss"]
    save_line_plot(lines, path, "Pretraining loss (loss/loss = forward + backward)", "iteration",
                   "cross-entropy, nats per token")


def to_markdown(summary: PretrainingSummary, report_dir: Path = Path(".")) -> str:
    """Pretraining section: final scalars, the curve, captions beside their references, and
    when given, what the captions name and where the decoder looks (links relative to
    ``report_dir``, where the report is written)."""
    lines = ["# Pretraining", "", f"Run: `{summary.directory}`", "", "| scalar | iteration | value |", "|---|---:|---:|"]
    for tag, points in sorted(summary.curves.items()):
        step, value = points[-1]
        lines.append(f"| {tag} | {step} | {value:.4f} |")
    lines += ["", f"![pretraining loss]({CURVES_FILE})", ""]
    if summary.examples:
        lines += ["## Example captions (val images, beam search)", "", "| image | generated | a reference |", "|---|---|---|"]
        for example in summary.examples:
            lines.append(f"| {example.image} | {example.generated} | {example.references[0]} |")
        lines.append("")
    if summary.caption_eval is not None:
        lines += _class_naming_markdown(summary.caption_eval)
    if summary.attention is not None:
        lines += _attention_markdown(summary.attention, report_dir)
    return "\n".join(lines)


def _rate(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _class_naming_markdown(evaluation: dict) -> list:
    """What the val captions name: the share of images whose caption names a class they show
    and one they do not, the class words' grounding gap, and per-class precision and recall."""
    scores, naming = evaluation["scores"], evaluation.get("class_naming")
    lines = ["## What the captions name (val images)", ""]
    if naming is None:
        return lines + ["The split has no instances file: the class words were not checked.", ""]
    lines += [(f"Captions naming a class the image shows: **{naming['names_present']:.0%}**; naming a class it "
              f"does not show: **{naming['names_absent']:.0%}** ({naming['images']} images). Grounding gap of the "
              f"class words (loss with another image minus loss with their own, nats): "
              f"{_rate(scores.get('class_word_gap'))}; CIDEr-D {_rate(scores.get('CIDEr-D'))}."), "",
              "| class | images naming it | images showing it | precision | recall |", "|---|---:|---:|---:|---:|"]
    for name, c in sorted(naming["per_class"].items(), key=lambda kv: -kv[1]["present"]):
        lines.append(f"| {name} | {c['named']} | {c['present']} | {_rate(c['precision'])} | {_rate(c['recall'])} |")
    return lines + [""]


def _attention_markdown(folder: Path, report_dir: Path) -> list:
    """Links to the decoder's attention maps (one grid per image: a map per generated word)."""
    folder = Path(folder)
    grids = sorted(folder.glob("*_attention.png"))
    relative = Path(os.path.relpath(folder, report_dir))
    lines = ["## Where the decoder looks (val images)", "",
             (f"Each word of the caption with the decoder's attention over the image; all maps: "
             f"[{relative / 'index.html'}]({relative / 'index.html'})."), ""]
    return lines + [f"![attention]({relative / grid.name})" for grid in grids] + [""]


def write_pretraining_files(summary: PretrainingSummary, output_dir: Path) -> list:
    """Write the pretraining plot into ``output_dir``; returns its path."""
    path = Path(output_dir) / CURVES_FILE
    plot_curves(summary.curves, path)
    return [path]
