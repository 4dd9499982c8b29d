"""One rank of tests/engine/test_shards_training.py's stream test, run under torchrun.

    torchrun --nproc-per-node 2 tests/engine/shard_stream_rank.py CONFIG OUTPUT_JSON BATCHES [KEY VALUE ...]

Builds the training dataset of CONFIG through the task table, reads BATCHES batches through
the loop's :class:`~pretrain.engine.streaming.StreamLoader` (its DataLoader, so that the
position of every sample is visible), and rank 0 writes every rank's ``[rank, reader, epoch,
image_id]`` records to OUTPUT_JSON.
"""
import json
import sys

from pretrain.config import load_config
from pretrain.data import collate_fn
from pretrain.distributed import (
    all_gather_objects,
    init_distributed,
    shutdown_distributed,
)
from pretrain.engine.streaming import StreamLoader
from pretrain.tasks import build_dataset
from pretrain.tokenizer import SentencePieceBPETokenizer


def main(config: str, output: str, batches: int, *overrides: str) -> None:
    ctx = init_distributed()
    cfg = load_config(config, list(overrides))
    dataset = build_dataset(cfg, "train", SentencePieceBPETokenizer(cfg.DATA.TOKENIZER_MODEL))
    stream = StreamLoader(dataset, cfg, ctx, collate_fn, None)
    records = []
    for step, (batch, metas) in enumerate(stream.loader):
        stream.progress.update(metas)
        records += [[ctx.rank, m.reader, m.position.epoch, int(i)] for m, i in zip(metas, batch["image_id"])]
        if step + 1 == batches:
            break
    gathered = all_gather_objects(records)
    if ctx.is_main:
        with open(output, "w") as handle:
            json.dump([r for part in gathered for r in part], handle)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
