"""The fixed captioning model of ``test_decoding_official.py``, and the official decoders' tokens
on it, regenerated from a checkout of the official code.

    python -m tests.pretrain_models.official_decoding_tables /path/to/kdexd/virtex

prints the four tables that the test holds as data (CI cannot fetch the official code). They were
made with kdexd/virtex at ae67b23 and torch 2.14.1 on CPU: the official
``AutoRegressiveBeamSearch`` and ``AutoRegressiveNucleusSampling`` (after
``torch.manual_seed(seed)``), driven by this model's next-token logits with the official
prefixes (``[SOS]`` alone first, then the generated tokens without it), as the official
``decoding_step`` feeds them. [EOS] and what follows it are written as 0, as the tables were
first recorded (the official rules keep [EOS]; the test pins that on its own).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from pretrain.models.captioning import CaptioningModel
from pretrain.models.textual_heads import TransformerTextualHead
from pretrain.models.visual_backbones import TorchvisionVisualBackbone

SOS, EOS = 1, 2
MODEL_VOCAB, MAX_LENGTH, IMAGES = 40, 12, 4
# (table name, official decoder, its settings, seed)
TABLES = [
    ("OFFICIAL_BEAM_3", "beam_search", {"beam_size": 3}, 0),
    ("OFFICIAL_GREEDY", "beam_search", {"beam_size": 1}, 0),
    ("OFFICIAL_NUCLEUS_09_SEED_0", "nucleus_sampling", {"nucleus_size": 0.9}, 0),
    ("OFFICIAL_NUCLEUS_05_SEED_1", "nucleus_sampling", {"nucleus_size": 0.5}, 1),
]


def fixed_model(decoder):
    """A one-layer, 32-wide captioning head in float64 with weights drawn from a fixed generator
    (not from the modules' initialisation), and fixed (B, 512, 2, 2) backbone features."""
    textual = TransformerTextualHead(512, MODEL_VOCAB, 32, 1, 2, 64, max_caption_length=MAX_LENGTH)
    model = CaptioningModel(TorchvisionVisualBackbone("resnet18", 512), textual, bidirectional=False,
                            decoder=decoder)
    generator = torch.Generator().manual_seed(2021)
    with torch.no_grad():
        for _, parameter in sorted(textual.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.5)
    features = torch.randn(IMAGES, 512, 2, 2, generator=generator, dtype=torch.float64)
    return model.double().eval(), features


def _official_module(checkout: Path, name: str):
    """One of the official decoder modules, loaded from its file (the ``virtex`` package's own
    imports need more than torch)."""
    path = checkout / "virtex" / "utils" / f"{name}.py"
    if not path.is_file():
        sys.exit(f"{path}: not found; give the root of a kdexd/virtex checkout")
    spec = importlib.util.spec_from_file_location(f"official_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def official_tables(checkout: Path) -> dict[str, list[list[int]]]:
    beam = _official_module(checkout, "beam_search").AutoRegressiveBeamSearch
    nucleus = _official_module(checkout, "nucleus_sampling").AutoRegressiveNucleusSampling
    model, features = fixed_model(decoder=None)
    memory = model.textual.project_visual(features)

    def step(partial: torch.Tensor) -> torch.Tensor:
        if partial.dim() == 1:  # the first step: [SOS] alone
            partial = partial.unsqueeze(1)
        copies = partial.size(0) // IMAGES
        hidden = model.textual.hidden_states(memory.repeat_interleave(copies, dim=0), partial, causal=True)
        return model.textual.output(hidden[:, -1])

    tables = {}
    for name, kind, settings, seed in TABLES:
        search = (beam if kind == "beam_search" else nucleus)(eos_index=EOS, max_steps=MAX_LENGTH, **settings)
        torch.manual_seed(seed)
        tokens, _ = search.search(torch.full((IMAGES,), SOS, dtype=torch.long), step)
        rows = []
        for row in tokens.tolist():
            row = row[: row.index(EOS)] if EOS in row else row
            rows.append(row + [0] * (MAX_LENGTH - len(row)))
        tables[name] = rows
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, help="root of a kdexd/virtex checkout")
    for name, rows in official_tables(parser.parse_args(argv).checkout).items():
        print(f"{name} = [")
        for row in rows:
            print(f"    {row},")
        print("]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
