"""Training batches from Megatron indexed corpora through megatron-core's GPTDataset and
BlendedMegatronDatasetBuilder (weighted blends, train/valid/test split, cached sample indices).

Sample order is fixed by the seed; a step consumes `global_batch_size` consecutive samples,
each micro-batch on data-parallel rank r takes its slice [r*mbs, (r+1)*mbs) of the next
mbs*dp samples, so ranks never overlap and a run resumed at `consumed_samples` sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from mohge.data.config import DataConfig
from mohge.data.errors import DataError
from mohge.data.integrity import check_manifest
from mohge.data.tokenizers import Tokenizer, load_tokenizer


@contextmanager
def _quiet_megatron():
    """megatron-core warns about missing Transformer Engine / apex on import and logs every index
    it builds; neither matters to its data layer."""
    logger = logging.getLogger("megatron")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)


@contextmanager
def _process_group_for_megatron():
    """megatron's blended builder calls torch.distributed.get_rank() even in one process: give it
    a world-size-1 gloo group for the duration when none exists."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


class _MegatronTokenizer:
    """What GPTDataset reads from a tokenizer: its end-of-document id, vocab size, and an identity
    that goes into the cached index's hash."""

    def __init__(self, tok: Tokenizer):
        self.eod = tok.eod
        self.vocab_size = tok.vocab_size
        self.pad = -1
        self.unique_identifiers = {"class": type(tok).__name__, "path": str(getattr(tok, "path", "")),
                                   "vocab_size": tok.vocab_size}


def check_prefix(prefix: str, tokenizer: Optional[Tokenizer] = None) -> int:
    """A clear error for a missing, truncated or mismatched .bin/.idx pair, before megatron reads
    it (checked against its manifest and the tokenizer when mohge-preprocess wrote it); returns
    the number of documents."""
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise DataError(f"data.prefixes: {prefix}{suffix} does not exist; run mohge-preprocess "
                            f"--output-prefix {prefix} first")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if os.path.getsize(prefix + ".bin") == 0:
        raise DataError(f"{prefix}.bin: empty (no documents); preprocess a non-empty input or drop it from "
                        "data.prefixes")
    try:
        with _quiet_megatron():
            index = IndexedDataset(prefix, mmap=True)
            expected = int(index.index.sequence_pointers[-1] + index.index.sequence_lengths[-1] *
                           index.index.dtype_size) if len(index) else 0
    except Exception as err:  # megatron raises assorted errors on a damaged index
        raise DataError(f"{prefix}.idx: unreadable or truncated ({err}); re-run mohge-preprocess") from err
    actual = os.path.getsize(prefix + ".bin")
    if actual < expected:
        raise DataError(f"{prefix}.bin: truncated ({actual} bytes, the index needs {expected}); "
                        "re-run mohge-preprocess")
    if actual != expected:
        raise DataError(f"{prefix}.idx: does not belong to {prefix}.bin (the index covers {expected} bytes, the "
                        f"file has {actual}); re-run mohge-preprocess for this prefix")
    check_manifest(prefix, *((tokenizer.vocab_size, tokenizer.eod) if tokenizer is not None else ()))
    return len(index)


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """The [begin, end) documents of the train, valid and test splits, as megatron computes them."""
    try:
        shares = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        shares = []
    if len(shares) != 3 or any(not x >= 0 for x in shares) or not sum(shares) > 0:
        raise DataError(f"data.split: {split!r} must be three non-negative shares train,valid,test (e.g. 969,30,1)")
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [(0, 0) if m is None else (int(round(m[0] * num_documents)), int(round(m[1] * num_documents)))
            for m in matrix]


def check_splits(split: str, documents: dict[str, int], need_valid: bool) -> list[bool]:
    """Which of (train, valid, test) to build. An empty split never reaches megatron, whose sample
    index loops forever on a split with no tokens; an empty train split (or valid split when
    validation runs) is a DataError naming the prefix and the share to raise."""
    keep = [True, need_valid, False]  # the test split is never read
    for prefix, n in documents.items():
        (t0, t1), (v0, v1), _ = split_ranges(split, n)
        if t1 <= t0:
            raise DataError(f"data.split={split}: the training share holds none of the {n} documents of {prefix}; "
                            "raise the first share")
        if need_valid and v1 <= v0:
            raise DataError(f"data.split={split}: the validation share holds none of the {n} documents of {prefix}; "
                            "raise the second share (e.g. data.split=90,10,0) or set train.eval_every=0")
    return keep


class MegatronData:
    """next_train_batch() / valid_batches() over megatron GPTDatasets for one data-parallel rank."""

    def __init__(self, train_ds, valid_ds, tokenizer: Tokenizer, micro_batch_size: int,
                 dp_rank: int, dp_size: int, needs_tokens: bool = True):
        self.train_ds, self.valid_ds = train_ds, valid_ds
        self.tokenizer = tokenizer
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.needs_tokens = needs_tokens
        self.consumed_samples = 0

    def _batch(self, dataset, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = first + self.dp_rank * self.micro_batch_size
        samples = [dataset[(start + i) % len(dataset)] for i in range(self.micro_batch_size)]
        tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
        labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
        return tokens, labels

    def next_train_batch(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        batch = self._batch(self.train_ds, self.consumed_samples) if self.needs_tokens else None
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    def valid_batches(self, num_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.valid_ds is None:
            raise DataError("the validation split is empty; raise its share in data.split or set train.eval_every=0")
        for b in range(num_batches):
            yield self._batch(self.valid_ds, b * self.micro_batch_size * self.dp_size)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def build_data(cfg: DataConfig, *, seq_len: int, micro_batch_size: int, seed: int, out_dir: str,
               model_vocab_size: int, dp_rank: int = 0, dp_size: int = 1, train_samples: int,
               valid_samples: int, needs_tokens: bool = True) -> MegatronData:
    """The configured corpora as a MegatronData for this rank (see the module docstring)."""
    if cfg.source == "embedded":
        from mohge.data.embedded import PREFIX, prepare

        directory = prepare(cfg.embedded_dir, quiet=dp_rank != 0)
        tokenizer_path, prefixes, weights = str(directory / "tokenizer.json"), [str(directory / PREFIX)], [1.0]
    elif cfg.source == "megatron":
        if not cfg.prefixes:
            raise DataError("data.prefixes: empty; give data.prefixes=[PREFIX,...] (see mohge-preprocess)")
        if cfg.weights and len(cfg.weights) != len(cfg.prefixes):
            raise DataError(f"data.weights: {len(cfg.weights)} weights for {len(cfg.prefixes)} prefixes")
        if cfg.weights and not all(0 < float(w) < float("inf") for w in cfg.weights):
            raise DataError(f"data.weights: {list(cfg.weights)} must all be positive and finite; drop a corpus "
                            "from data.prefixes instead of giving it weight 0")
        if cfg.tokenizer is None:
            raise DataError("data.tokenizer: required with data.source=megatron (tokenizer.json, .model or 'bytes')")
        tokenizer_path, prefixes, weights = cfg.tokenizer, list(cfg.prefixes), list(cfg.weights) or None
    else:
        raise DataError(f"data.source: {cfg.source!r}; use embedded, megatron or synthetic")

    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(f"data.tokenizer={tokenizer_path} has {tokenizer.vocab_size} tokens but model.vocab_size is "
                        f"{model_vocab_size}; raise model.vocab_size to at least {tokenizer.vocab_size}")
    documents = {prefix: check_prefix(prefix, tokenizer) for prefix in prefixes}
    keep = check_splits(cfg.split, documents, need_valid=valid_samples > 0)

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    cache = cfg.cache_dir or str(Path(out_dir) / "data_cache")
    with _quiet_megatron():
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_len, blend=(prefixes, weights), split=cfg.split,
            path_to_cache=cache, tokenizer=_MegatronTokenizer(tokenizer), reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        )
        config.split_matrix = [m if k else None for m, k in zip(config.split_matrix, keep)]
        with _process_group_for_megatron():
            train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
                GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
            ).build()
    if train_ds is None:
        raise DataError(f"data.split={cfg.split}: the training split is empty")
    return MegatronData(train_ds, valid_ds, tokenizer, micro_batch_size, dp_rank, dp_size, needs_tokens)
