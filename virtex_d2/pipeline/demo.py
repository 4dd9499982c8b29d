"""The demo pipeline on the built-in dataset, as a list of stages (the library side of tools/demo.py).

Data -> vocabulary -> bicaptioning pretraining -> captions -> backbone conversion -> LVIS
Mask R-CNN fine-tuning from VirTex and from random initialisation (same schedule and seed)
-> report. ``backbone`` chooses the ResNet-18 path (FPN Mask R-CNN) or the ViT-Ti/16 one
(ViTDet Mask R-CNN); the stages are the same. Each stage is one of the project's own command-line tools, so a user can re-run any
of them by hand with the command the demo prints.
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
from pretrain.config import config_differences, load_config
from pretrain.data.synthetic import check_sizes, is_complete
from pretrain.errors import BadValueError
from virtex_d2.pipeline.stages import SideBySide, Stage
from virtex_d2.reports.pretraining import read_caption_examples

PRETRAIN_CONFIG = "configs/builtin/bicaptioning_R_18_L1_H256.yaml"
FINETUNE_CONFIG = "configs/detectron2/builtin/lvis_segm_R_18_FPN_builtin.yaml"
#: --backbone -> (pretraining config, fine-tuning config, name of the converted weights)
BACKBONES = {
    "resnet": (PRETRAIN_CONFIG, FINETUNE_CONFIG, "virtex_R_18.pth"),
    "vit": ("configs/builtin/bicaptioning_ViT_T_16_L1_H192.yaml",
            "configs/detectron2/builtin/lvis_segm_ViTDet_T_builtin.yaml", "virtex_ViT_T_16.pth"),
}
VOCAB_SIZE = 256
LVIS_VAL = "lvis_v1_val"


@dataclass
class DemoSettings:
    """Where the demo reads and writes, and how big each stage is.

    ``checkout`` is the virtex-d2 checkout whose ``tools/`` and ``configs/`` the stages run:
    each stage is one of the project's command-line tools, so that a user can re-run it by hand.
    """

    checkout: Path = Path(".")
    data_root: Path = Path("datasets/builtin")
    output_dir: Path = Path("outputs/demo")
    num_train: int = 1000
    num_val: int = 100
    image_size: int = 256
    pretrain_iters: int = 600
    finetune_iters: int = 300
    seed: int = 0
    num_captions: int = 6
    backbone: str = "resnet"

    def __post_init__(self):
        """Settings no stage could run with are refused before the first stage starts."""
        if self.backbone not in BACKBONES:
            raise BadValueError(f"--backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        check_sizes(self.num_train, self.num_val)
        for name in ("pretrain_iters", "finetune_iters", "image_size"):
            if getattr(self, name) < 1:
                raise BadValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    @property
    def vocab_prefix(self) -> Path:
        return self.data_root / "vocab" / f"builtin_{VOCAB_SIZE}"

    @property
    def pretrain_dir(self) -> Path:
        return self.output_dir / "pretrain"

    @property
    def final_checkpoint(self) -> Path:
        return checkpoint_path(self.pretrain_dir, self.pretrain_iters)

    @property
    def captions_file(self) -> Path:
        return self.output_dir / "captions_val.json"

    @property
    def caption_references(self) -> Path:
        return self.data_root / "coco" / "annotations" / "captions_val2017.json"

    @property
    def weights(self) -> Path:
        return self.output_dir / BACKBONES[self.backbone][2]

    def finetune_dir(self, init: str) -> Path:
        return self.output_dir / f"lvis_{init}"

    @property
    def pretrain_config(self) -> Path:
        return self.checkout / BACKBONES[self.backbone][0]

    @property
    def finetune_config(self) -> Path:
        return self.checkout / BACKBONES[self.backbone][1]

    def tool(self, name: str) -> list:
        """The command that runs ``tools/<name>`` with this interpreter."""
        return [sys.executable, str(self.checkout / "tools" / name)]


def _dataset_complete(s: DemoSettings) -> bool:
    try:
        return is_complete(s.data_root, s.num_train, s.num_val, s.image_size)
    except ValueError:  # a malformed manifest: the dataset stage rebuilds or reports it
        return False


def _pretrain_overrides(s: DemoSettings) -> list[str]:
    """The demo's keys over the pretraining config; a run shorter than the config's warm-up
    warms up for all of it (a warm-up longer than the run is refused as a config value)."""
    warmup = load_config(str(s.pretrain_config)).OPTIM.WARMUP_STEPS
    return [
        "DATA.ROOT", str(s.data_root / "coco"), "DATA.TOKENIZER_MODEL", f"{s.vocab_prefix}.model",
        "OPTIM.NUM_ITERATIONS", str(s.pretrain_iters), "RANDOM_SEED", str(s.seed),
        *(["OPTIM.WARMUP_STEPS", str(s.pretrain_iters)] if s.pretrain_iters < warmup else []),
    ]


def _pretraining_made_otherwise(s: DemoSettings) -> str | None:
    """Which config keys the newest checkpoint in the pretraining folder was trained with
    differently from what the demo asks for now (an edited config, another seed or length), or
    None; reusing or resuming it would report one recipe's results under another's name."""
    saved = list_checkpoints(s.pretrain_dir)
    if not saved:
        return None
    newest = saved[-1][1]
    try:
        state = read_training_checkpoint(newest)
    except CheckpointError:  # unreadable: the trainer falls back to an older one and says so
        return None
    wanted = load_config(str(s.pretrain_config), _pretrain_overrides(s))
    changes = config_differences(state["config"], wanted) if "config" in state else ["it records no config"]
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


def _finetune_stage(s: DemoSettings, init: str, weights: str) -> Stage:
    directory = s.finetune_dir(init)
    command = [
        *s.tool("train_net.py"), "--config-file", s.finetune_config,
        "MODEL.WEIGHTS", weights, "VIRTEX.INIT_NAME", init, "SEED", s.seed,
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
    )


def build_stages(s: DemoSettings) -> list:
    """The demo's stages in order; ``s`` fixes every path and size."""
    pretrain = [*s.tool("pretrain.py"), "--config", s.pretrain_config, "--output-dir", s.pretrain_dir,
                *_pretrain_overrides(s)]
    return [
        Stage(
            name="dataset",
            command=[*s.tool("make_synthetic_dataset.py"), "--root", s.data_root, "--num-train", s.num_train,
                     "--num-val", s.num_val, "--image-size", s.image_size],
            is_complete=lambda: _dataset_complete(s),
            force_args=["--force"],
        ),
        Stage(
            name="vocabulary",
            command=[*s.tool("build_vocabulary.py"), "--captions",
                     s.data_root / "coco" / "annotations" / "captions_train2017.json",
                     "--output", s.vocab_prefix, "--vocab-size", VOCAB_SIZE],
            is_complete=lambda: Path(f"{s.vocab_prefix}.model").is_file(),
            force_args=["--force"],
        ),
        Stage(
            name="pretrain",
            command=pretrain,
            is_complete=lambda: _checkpoint_valid(s.final_checkpoint),
            outputs=[s.pretrain_dir],
            resume_args=["--resume"],
            is_partial=lambda: bool(list_checkpoints(s.pretrain_dir)),
            outdated=lambda: _pretraining_made_otherwise(s),
        ),
        Stage(
            name="captions",
            command=[*s.tool("caption.py"), "--config", s.pretrain_config, "--checkpoint", s.final_checkpoint,
                     "--images", s.data_root / "coco" / "val2017", "--output", s.captions_file,
                     "--opts", "DATA.TOKENIZER_MODEL", f"{s.vocab_prefix}.model"],
            is_complete=lambda: s.captions_file.is_file(),
            force_args=["--force"],
            report=lambda: print_caption_examples(s),
        ),
        Stage(
            name="convert",
            command=[*s.tool("convert_backbone.py"), "--input", s.final_checkpoint, "--output", s.weights,
                     "--config-file", s.finetune_config],
            is_complete=lambda: s.weights.is_file(),
            force_args=["--force"],
        ),
        # Independent of each other: on a 2-core CPU, one process per core trains both in about
        # 72 % of the time of one after the other; their evaluations gain nothing (docs/demo.md).
        SideBySide([_finetune_stage(s, "virtex", str(s.weights)), _finetune_stage(s, "random", "")],
                   log_dir=s.output_dir / "logs"),
        Stage(
            name="report",
            command=[*s.tool("report.py"), f"virtex={s.finetune_dir('virtex')}", f"random={s.finetune_dir('random')}",
                     "--output", s.output_dir, "--pretrain-dir", s.pretrain_dir, "--captions", s.captions_file,
                     "--caption-references", s.caption_references, "--num-captions", s.num_captions, "--force"],
            is_complete=lambda: (s.output_dir / "report.md").is_file(),
        ),
    ]


def lvis_mask_ap(s: DemoSettings) -> dict:
    """LVIS val mask AP per initialisation, as the evaluator wrote it."""
    results = {}
    for init in ("virtex", "random"):
        record = json.loads((s.finetune_dir(init) / "inference" / LVIS_VAL / RESULTS_FILE).read_text())
        results[init] = record["results"]["segm"]["AP"]
    return results
