"""Data config: which corpora, how they are tokenized and blended, and the loader's shape."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """`source=embedded` trains on the bundled default corpus (prepared on first use);
    `source=megatron` reads Megatron indexed corpora (`prefixes` + `weights`)."""

    source: str = "embedded"
    tokenizer: str | None = None  # path to tokenizer.json / sentencepiece .model; None: embedded
    prefixes: list[str] = field(default_factory=list)  # PREFIX of PREFIX.bin / PREFIX.idx
    weights: list[float] = field(default_factory=list)  # blend weights, one per prefix
    split: str = "969,30,1"  # train, valid, test shares of each corpus
    cache_dir: str | None = None  # index cache; None: <out_dir>/data_cache
    embedded_dir: str | None = None  # where the embedded corpus is prepared; None: ~/.cache/mohge
    num_workers: int = 0
