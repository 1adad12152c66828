"""A synthetic, learnable token source for tests and benchmarks (`data.source=synthetic`).

Each sample is a walk through a fixed random sparse Markov chain over the vocabulary, drawn from a
generator seeded by (seed, sample index): deterministic, identical under any data-parallel
layout, resumable from a consumed-sample count, and learnable, so the loss really falls.
"""

from __future__ import annotations

from typing import Iterator

import torch

BRANCHES = 4  # successors per token in the chain


class SyntheticTokenizer:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = 0


class SyntheticData:
    """Same interface as data.loader's object: next_train_batch, valid_batches, consumed_samples."""

    def __init__(self, vocab_size: int, seq_len: int, micro_batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1):
        self.tokenizer = SyntheticTokenizer(vocab_size)
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = 0
        gen = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(0, vocab_size, (vocab_size, BRANCHES), generator=gen)

    def sample(self, index: int) -> torch.Tensor:
        """seq_len + 1 tokens of sample `index`."""
        gen = torch.Generator().manual_seed(self.seed * 7_919 + index)
        choices = torch.randint(0, BRANCHES, (self.seq_len,), generator=gen)
        tokens = [int(torch.randint(0, self.tokenizer.vocab_size, (1,), generator=gen))]
        for c in choices.tolist():
            tokens.append(int(self.successors[tokens[-1], c]))
        return torch.tensor(tokens)

    def _batch(self, first_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = first_index + self.dp_rank * self.micro_batch_size
        rows = torch.stack([self.sample(start + i) for i in range(self.micro_batch_size)])
        return rows[:, :-1], rows[:, 1:]

    def next_train_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._batch(self.consumed_samples)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    def valid_batches(self, num_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Held out by index: validation samples come from the negative index range."""
        for b in range(num_batches):
            yield self._batch(-(b + 1) * self.micro_batch_size * self.dp_size - 10**9)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
