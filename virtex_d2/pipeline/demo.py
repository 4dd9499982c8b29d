"""The demo pipeline on the built-in dataset, as a list of stages (the library side of tools/demo.py).

Data -> vocabulary -> bicaptioning pretraining -> captions, their class words and attention
maps -> backbone conversion -> LVIS Mask R-CNN fine-tuning from each initialisation (same
schedule and seed) -> report. The initialisations: VirTex (the captioning backbone), the
official random-init baseline (``tools/convert_backbone.py --init random``: what the paper
compares with), optionally the labels control (the same backbone and budget trained on the
class labels instead of the captions, the paper's multi-label classification row) and
detectron2's own random init. ``backbone`` chooses the ResNet-18 path (FPN Mask R-CNN) or the
ViT-Ti/16 one (ViTDet Mask R-CNN); the stages are the same. Each stage is one of the project's
own command-line tools, so a user can re-run any of them by hand with the command the demo prints.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from detectron2_ext.evaluation import RESULTS_FILE
from pretrain.checkpoint_io import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    read_training_checkpoint,
)
from pretrain.config import EXECUTION_ONLY_KEYS, config_differences, load_config
from pretrain.data.synthetic import check_sizes, is_complete
from pretrain.errors import BadValueError
from pretrain.files import write_json_atomic, write_text_atomic
from virtex_d2.pipeline.stages import SideBySide, Stage, format_timings
from virtex_d2.reports.pretraining import read_caption_examples


@dataclass(frozen=True)
class Backbone:
    """One backbone the demo can run: its configs and how its random-init baseline is made."""

    pretrain_config: str
    finetune_config: str
    name: str  # in the converted weights' file names
    random_init_args: tuple  # tools/convert_backbone.py --init random flags (plus --seed)
    labels_config: str | None  # the labels control's pretraining config, where there is one


BACKBONES = {
    "resnet": Backbone("configs/builtin/bicaptioning_R_18_L1_H256.yaml",
                       "configs/detectron2/builtin/lvis_segm_R_18_FPN_builtin.yaml", "R_18",
                       ("--depth", 18), "configs/builtin/multilabel_classification_R_18.yaml"),
    "vit": Backbone("configs/builtin/bicaptioning_ViT_T_16_L1_H192.yaml",
                    "configs/detectron2/builtin/lvis_segm_ViTDet_T_builtin.yaml", "ViT_T_16",
                    ("--vit", "vit_tiny_patch16_224", "--image-size", 128), None),
}
#: The initialisations the demo can fine-tune from, in the report's order: the captioning
#: backbone, the official random-init baseline, the labels control, detectron2's own init.
INITS = ("virtex", "random", "labels", "default")
DEFAULT_INITS = ("virtex", "random")
VOCAB_SIZE = 256
LVIS_VAL = "lvis_v1_val"


def pretrain_name(task: str) -> str:
    """The name of a pretraining's stage and of its folder: ``task`` is "captions" or "labels"."""
    return "pretrain" if task == "captions" else f"pretrain_{task}"


@dataclass
class DemoSettings:
    """Where the demo reads and writes, and how big each stage is.

    ``checkout`` is the virtex-d2 checkout whose ``tools/`` and ``configs/`` the stages run:
    each stage is one of the project's command-line tools, so that a user can re-run it by hand.
    """

    checkout: Path = Path(".")
    data_root: Path = Path("datasets/builtin")
    output_dir: Path = Path("outputs/demo")
    num_train: int = 4000
    num_val: int = 300
    image_size: int = 128
    pretrain_iters: int = 600
    finetune_iters: int = 600
    seed: int = 0
    num_captions: int = 6
    backbone: str = "resnet"
    inits: tuple = DEFAULT_INITS
    attention_images: int = 4

    def __post_init__(self):
        """Settings no stage could run with are refused before the first stage starts."""
        if self.backbone not in BACKBONES:
            raise BadValueError(f"--backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        unknown = [init for init in self.inits if init not in INITS]
        if unknown or not self.inits or len(set(self.inits)) != len(self.inits):
            raise BadValueError(f"--inits takes distinct names among {', '.join(INITS)}, got {' '.join(self.inits)}")
        if "labels" in self.inits and self.spec.labels_config is None:
            raise BadValueError(f"--inits labels: there is no labels control for --backbone {self.backbone}")
        self.inits = tuple(init for init in INITS if init in self.inits)  # the report's order
        check_sizes(self.num_train, self.num_val)
        for name in ("pretrain_iters", "finetune_iters", "image_size"):
            if getattr(self, name) < 1:
                raise BadValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    @property
    def spec(self) -> Backbone:
        return BACKBONES[self.backbone]

    @property
    def vocab_prefix(self) -> Path:
        return self.data_root / "vocab" / f"builtin_{VOCAB_SIZE}"

    def pretrain_dir(self, task: str = "captions") -> Path:
        """Where the captioning (or, for ``"labels"``, the labels control's) pretraining writes."""
        return self.output_dir / pretrain_name(task)

    def final_checkpoint(self, task: str = "captions") -> Path:
        return checkpoint_path(self.pretrain_dir(task), self.pretrain_iters)

    @property
    def captions_file(self) -> Path:
        return self.output_dir / "captions_val.json"

    @property
    def caption_eval_file(self) -> Path:
        return self.output_dir / "caption_eval_val.json"

    @property
    def attention_dir(self) -> Path:
        return self.output_dir / "attention"

    @property
    def caption_references(self) -> Path:
        return self.data_root / "coco" / "annotations" / "captions_val2017.json"

    def weights(self, init: str) -> Path | None:
        """The converted backbone an initialisation fine-tunes from (None: detectron2's own init)."""
        return None if init == "default" else self.output_dir / f"{init}_{self.spec.name}.pth"

    def finetune_dir(self, init: str) -> Path:
        return self.output_dir / f"lvis_{init}"

    def pretrain_config(self, task: str = "captions") -> Path:
        return self.checkout / (self.spec.pretrain_config if task == "captions" else self.spec.labels_config)

    @property
    def finetune_config(self) -> Path:
        return self.checkout / self.spec.finetune_config

    def tool(self, name: str) -> list:
        """The command that runs ``tools/<name>`` with this interpreter."""
        return [sys.executable, str(self.checkout / "tools" / name)]


def _dataset_complete(s: DemoSettings) -> bool:
    try:
        return is_complete(s.data_root, s.num_train, s.num_val, s.image_size)
    except ValueError:  # a malformed manifest: the dataset stage rebuilds or reports it
        return False


def _pretrain_overrides(s: DemoSettings, task: str) -> list[str]:
    """The demo's keys over a pretraining config; a run shorter than the config's warm-up
    warms up for all of it (a warm-up longer than the run is refused as a config value)."""
    warmup = load_config(str(s.pretrain_config(task))).OPTIM.WARMUP_STEPS
    return [
        "DATA.ROOT", str(s.data_root / "coco"), "DATA.TOKENIZER_MODEL", f"{s.vocab_prefix}.model",
        "OPTIM.NUM_ITERATIONS", str(s.pretrain_iters), "RANDOM_SEED", str(s.seed),
        *(["OPTIM.WARMUP_STEPS", str(s.pretrain_iters)] if s.pretrain_iters < warmup else []),
    ]


def _pretraining_made_otherwise(s: DemoSettings, task: str) -> str | None:
    """Which config keys the newest checkpoint in a pretraining folder was trained with
    differently from what the demo asks for now (an edited config, another seed or length), or
    None; reusing or resuming it would report one recipe's results under another's name. Keys
    that only change how a run is executed (checkpoint period, compilation) do not count."""
    saved = list_checkpoints(s.pretrain_dir(task))
    if not saved:
        return None
    newest = saved[-1][1]
    try:
        state = read_training_checkpoint(newest)
    except CheckpointError:  # unreadable: the trainer falls back to an older one and says so
        return None
    wanted = load_config(str(s.pretrain_config(task)), _pretrain_overrides(s, task))
    changes = (config_differences(state["config"], wanted, ignore=EXECUTION_ONLY_KEYS) if "config" in state
               else ["it records no config"])
    if not changes:
        return None
    return (f"{newest} does not match the demo's pretraining config ({'; '.join(changes)}); "
            "use another --output-dir to keep it")


def _checkpoint_valid(path: Path) -> bool:
    try:
        read_training_checkpoint(path)
    except (CheckpointError, FileNotFoundError):
        return False
    return True


def _evaluated(directory: Path) -> bool:
    return (directory / "inference" / LVIS_VAL / RESULTS_FILE).is_file()


def print_caption_examples(s: DemoSettings) -> None:
    """Print a few generated captions of val images next to one of their references."""
    print("Generated captions of val images (beam search) next to a human-style reference:")
    for example in read_caption_examples(s.captions_file, s.caption_references, s.num_captions):
        print(f"  {example.image}\n    model:     {example.generated}\n    reference: {example.references[0]}")


def print_class_naming(s: DemoSettings) -> None:
    """Print how often the val captions name a class the image shows, and one it does not."""
    naming = json.loads(s.caption_eval_file.read_text())["scores"]
    print(f"Val captions naming a class the image shows: {naming['class_names_present']:.0%}; "
          f"naming one it does not show: {naming['class_names_absent']:.0%}")


def _iterations_done(directory: Path) -> int:
    """Training iterations detectron2 has logged to ``metrics.json`` (every 20 by default)."""
    try:
        lines = (directory / "metrics.json").read_text().splitlines()
    except OSError:  # not written yet
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["iteration"]) + 1
        except (KeyError, ValueError):  # a line being written, or one without an iteration
            continue
    return 0


def _pretrain_stage(s: DemoSettings, task: str) -> Stage:
    directory = s.pretrain_dir(task)
    return Stage(
        name=pretrain_name(task),
        command=[*s.tool("pretrain.py"), "--config", s.pretrain_config(task), "--output-dir", directory,
                 *_pretrain_overrides(s, task)],
        is_complete=lambda: _checkpoint_valid(s.final_checkpoint(task)),
        outputs=[directory],
        resume_args=["--resume"],
        is_partial=lambda: bool(list_checkpoints(directory)),
        outdated=lambda: _pretraining_made_otherwise(s, task),
        needs=("dataset", "vocabulary"),
    )


def _convert_stage(s: DemoSettings, init: str) -> Stage:
    """The stage that writes the detectron2 weights ``init`` fine-tunes from."""
    weights = s.weights(init)
    if init == "random":
        source, needs = ["--init", "random", *s.spec.random_init_args, "--seed", s.seed], ()
    else:
        task = "captions" if init == "virtex" else init
        source, needs = ["--input", s.final_checkpoint(task)], (pretrain_name(task),)
    return Stage(
        name=f"convert_{init}",
        command=[*s.tool("convert_backbone.py"), *source, "--output", weights, "--config-file", s.finetune_config],
        is_complete=weights.is_file,
        force_args=["--force"],
        needs=needs,
    )


def _finetune_stage(s: DemoSettings, init: str) -> Stage:
    directory = s.finetune_dir(init)
    weights = s.weights(init)
    command = [
        *s.tool("train_net.py"), "--config-file", s.finetune_config,
        "MODEL.WEIGHTS", weights or "", "VIRTEX.INIT_NAME", init, "SEED", s.seed,
        "SOLVER.MAX_ITER", s.finetune_iters, "OUTPUT_DIR", directory,
    ]
    return Stage(
        name=f"finetune_lvis_{init}",
        command=command,
        is_complete=lambda: _evaluated(directory),
        outputs=[directory],
        resume_args=["--resume"],
        is_partial=lambda: (directory / "last_checkpoint").is_file(),
        progress=lambda: (_iterations_done(directory), s.finetune_iters),
        needs=("dataset", *([] if weights is None else [f"convert_{init}"])),
    )


def build_stages(s: DemoSettings) -> list:
    """The demo's stages in order; ``s`` fixes every path and size."""
    checkpoint = s.final_checkpoint()
    caption_tool_args = ["--config", s.pretrain_config(), "--checkpoint", checkpoint,
                         "--opts", "DATA.ROOT", s.data_root / "coco", "DATA.TOKENIZER_MODEL", f"{s.vocab_prefix}.model"]
    stages = [
        Stage(
            name="dataset",
            command=[*s.tool("make_synthetic_dataset.py"), "--root", s.data_root, "--num-train", s.num_train,
                     "--num-val", s.num_val, "--image-size", s.image_size],
            is_complete=lambda: _dataset_complete(s),
            force_args=["--force"],
            needs=(),
        ),
        Stage(
            name="vocabulary",
            command=[*s.tool("build_vocabulary.py"), "--captions",
                     s.data_root / "coco" / "annotations" / "captions_train2017.json",
                     "--output", s.vocab_prefix, "--vocab-size", VOCAB_SIZE],
            is_complete=lambda: Path(f"{s.vocab_prefix}.model").is_file(),
            force_args=["--force"],
            needs=("dataset",),
        ),
        _pretrain_stage(s, "captions"),
        Stage(
            name="captions",
            command=[*s.tool("caption.py"), "--config", s.pretrain_config(), "--checkpoint", checkpoint,
                     "--images", s.data_root / "coco" / "val2017", "--output", s.captions_file,
                     "--opts", "DATA.TOKENIZER_MODEL", f"{s.vocab_prefix}.model"],
            is_complete=lambda: s.captions_file.is_file(),
            force_args=["--force"],
            report=lambda: print_caption_examples(s),
        ),
        Stage(
            name="caption_eval",
            command=[*s.tool("eval_captioning.py"), "--output", s.caption_eval_file, "--words", 0,
                     "--num-workers", 0, *caption_tool_args],
            is_complete=lambda: s.caption_eval_file.is_file(),
            force_args=["--force"],
            report=lambda: print_class_naming(s),
        ),
        Stage(
            name="attention",
            command=[*s.tool("visualize_attention.py"), "--output-dir", s.attention_dir,
                     "--max-images", s.attention_images, *caption_tool_args],
            is_complete=lambda: (s.attention_dir / "index.html").is_file(),
            outputs=[s.attention_dir],
        ),
    ]
    if "labels" in s.inits:
        stages.append(_pretrain_stage(s, "labels"))
    stages += [_convert_stage(s, init) for init in s.inits if init != "default"]
    # Independent of each other: on a 2-core CPU, one process per core trains two in about
    # 72 % of the time of one after the other; their evaluations gain nothing (docs/demo_history.md).
    stages.append(SideBySide([_finetune_stage(s, init) for init in s.inits], log_dir=s.output_dir / "logs"))
    stages.append(Stage(
        name="report",
        command=[*s.tool("report.py"), *(f"{init}={s.finetune_dir(init)}" for init in s.inits),
                 "--output", s.output_dir, "--pretrain-dir", s.pretrain_dir(), "--captions", s.captions_file,
                 "--caption-references", s.caption_references, "--caption-eval", s.caption_eval_file,
                 "--attention", s.attention_dir, "--num-captions", s.num_captions, "--force"],
        is_complete=lambda: (s.output_dir / "report.md").is_file(),
    ))
    return stages


def lvis_mask_ap(s: DemoSettings) -> dict:
    """LVIS val mask AP per initialisation, as the evaluator wrote it; None where it has none
    (a model that detected nothing: the evaluator then leaves the mask task out)."""
    results = {}
    for init in s.inits:
        record = json.loads((s.finetune_dir(init) / "inference" / LVIS_VAL / RESULTS_FILE).read_text())
        results[init] = record["results"].get("segm", {}).get("AP")
    return results


TIMINGS_HEADING = "# Time per stage"


def add_timings_to_report(s: DemoSettings, results) -> bool:
    """Append the stage timings to report.md and report.json when the report stage ran in this
    run (it rewrites both, so a section is never doubled); returns whether it did. When the report
    was already complete and skipped, its earlier timings stay: this run's zeros would mislead."""
    if not any(r.name == "report" and r.status != "skipped" for r in results):
        return False
    table = format_timings(results)
    report = s.output_dir / "report.md"
    write_text_atomic(report, report.read_text().rstrip("\n") + f"\n\n{TIMINGS_HEADING}\n\nSeconds on this machine; "
                      "stages that ran side by side count once in the total, by the longest of them.\n\n"
                      f"```text\n{table}\n```\n")
    record_path = s.output_dir / "report.json"
    record = json.loads(record_path.read_text())
    record["stage_seconds"] = {r.name: {"status": r.status, "seconds": round(r.seconds, 1)} for r in results}
    write_json_atomic(record_path, record, allow_nan=False)
    return True
