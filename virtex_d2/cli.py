"""What the command-line tools share: their parser, the common flags, one-line errors.

Every evaluation tool reads a pretraining config and a checkpoint and takes the same flags for
them; they are declared here once so that they read and behave the same in every tool.
"""
from __future__ import annotations

import argparse
import sys

CHECKPOINT_HELP = "official VirTex or virtex-d2 checkpoint (.pth)"
DEVICE_HELP = "torch device (default: the accelerator if any, else cpu)"


def tool_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows the tool's docstring as written (examples included)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_flags(
    parser: argparse.ArgumentParser,
    *,
    config_help: str = "pretraining config (YAML) of the checkpoint",
    checkpoint: argparse._ActionsContainer | bool = True,
    checkpoint_help: str = CHECKPOINT_HELP,
    device: bool = True,
    force_help: str = "overwrite an existing output file",
) -> None:
    """``--config``, ``--checkpoint``, ``--device``, ``--force`` and ``--opts KEY VALUE ...``.

    ``checkpoint``: True for a required ``--checkpoint``, False for none, or a (mutually
    exclusive) group to add an optional one to.
    """
    parser.add_argument("--config", required=True, help=config_help)
    if checkpoint is True:
        parser.add_argument("--checkpoint", required=True, help=checkpoint_help)
    elif checkpoint is not False:
        checkpoint.add_argument("--checkpoint", help=checkpoint_help)
    if device:
        parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--force", action="store_true", help=force_help)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")


def report_error(tool: str, error: BaseException, status: int = 1) -> int:
    """Print ``tool: error: <message>`` on one line to stderr; returns the exit status to use."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{tool}: error: {message}", file=sys.stderr)
    return status
