"""Chunked output projection + cross-entropy == F.cross_entropy on the whole logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mohge.model.loss import chunked_linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_matches_whole_logits(chunk):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (23,), generator=gen)
    labels[[3, 11]] = -100  # ignored positions, as F.cross_entropy's default ignore_index
    expected = F.cross_entropy(h @ w.t(), labels)
    (expected * 3.0).backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = chunked_linear_cross_entropy(h, w, labels, chunk=chunk)
    (loss * 3.0).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(h.grad, grads[0])
    torch.testing.assert_close(w.grad, grads[1])


def test_chunked_without_grad_and_in_bf16():
    gen = torch.Generator().manual_seed(1)
    h, w = torch.randn(9, 8, generator=gen), torch.randn(30, 8, generator=gen)
    labels = torch.randint(0, 30, (9,), generator=gen)
    with torch.no_grad():
        assert torch.allclose(chunked_linear_cross_entropy(h, w, labels, 4), F.cross_entropy(h @ w.t(), labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_linear_cross_entropy(h, w, labels, 4)
        expected = F.cross_entropy((h @ w.t()).float(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)


def test_training_with_chunked_loss_matches_whole_logits(tmp_path):
    from mohge.train.hydra_config import compose_config
    from mohge.train.trainer import Trainer

    common = ["data=synthetic", "logging.progress=false", "train.eval_every=0", "train.log_every=1",
              "train.steps=3", "checkpoint.save_final=false"]
    runs = []
    for name, extra in (("whole", []), ("chunked", ["train.loss_chunk_tokens=24"])):
        trainer = Trainer(compose_config("tiny_mohge", [*common, f"out_dir={tmp_path / name}", *extra]))
        runs.append([trainer.train_step()[0] for _ in range(3)])
        assert trainer.model.loss_chunk_tokens == (24 if extra else 0)  # the chunked path ran
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)
