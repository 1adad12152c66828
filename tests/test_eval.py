"""mohge-eval: perplexity of a checkpoint on jsonl text and on Megatron .bin/.idx."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mohge.data.preprocess import preprocess
from mohge.data.tokenizers import ByteTokenizer
from mohge.launch.eval_cli import main as eval_main, windows
from mohge.train.hydra_config import compose_config
from mohge.train.trainer import Trainer, train

OVERRIDES = ["data=synthetic", "logging.progress=false", "train.eval_every=0", "train.steps=2", "model.vocab_size=260"]
DOCS = ["In the beginning was the word.", "And the word was with God, and the word was God.", "Amen."]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(compose_config("tiny_mohge", [*OVERRIDES, f"out_dir={out}"]))
    return out


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def _reference(run_dir, seq_len: int) -> tuple[float, int]:
    """Mean next-token loss written out here: the trainer's model over the byte stream, window by window."""
    tok = ByteTokenizer()
    stream = [t for d in DOCS for t in tok.encode(d) + [tok.eod]]
    trainer = Trainer(compose_config("tiny_mohge", [*OVERRIDES, f"out_dir={run_dir}", "checkpoint.resume=auto"]))
    trainer.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq_len):
            x = torch.tensor([stream[start:start + seq_len + 1]])
            total += float(F.cross_entropy(trainer.model(x[:, :-1])[0], x[0, 1:], reduction="sum"))
            count += x.shape[1] - 1
    assert count == len(stream) - 1
    return total / count, count


def test_perplexity_of_jsonl_and_megatron_data_match_the_trainer(run_dir, jsonl, tmp_path, capsys):
    loss, count = _reference(run_dir, 32)
    args = ["--checkpoint", str(run_dir), "--seq-len", "32", "--batch-size", "2", "--no-progress"]
    assert eval_main([*args, "--data", str(jsonl), "--tokenizer", "bytes", "--json", str(tmp_path / "r.json")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert line == f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  tokens {count}"

    preprocess([str(jsonl)], str(tmp_path / "held"), "bytes", workers=1, progress=False)
    assert eval_main([*args, "--data", str(tmp_path / "held.bin"), "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text()) == {**result, "data": [str(tmp_path / "held.bin")]}


def test_windows_score_every_token_once():
    stream = iter([torch.arange(10).numpy(), torch.arange(10, 23).numpy()])
    chunks = list(windows(stream, 8))
    assert [c.tolist() for c in chunks] == [list(range(0, 9)), list(range(8, 17)), list(range(16, 23))]
    assert list(windows(iter([torch.arange(30).numpy()]), 8, max_tokens=16))[-1].tolist() == list(range(8, 17))


def test_eval_errors_name_the_input(run_dir, jsonl, tmp_path, capsys):
    base = ["--checkpoint", str(run_dir), "--no-progress"]
    assert eval_main([*base, "--data", str(jsonl)]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert eval_main([*base, "--data", str(tmp_path / "none")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert eval_main([*base, "--data", str(jsonl), "--tokenizer", "bytes", "--seq-len", "999"]) == 2
    assert "--seq-len 999" in capsys.readouterr().err
    assert eval_main(["--checkpoint", str(tmp_path / "nope"), "--data", str(jsonl), "--tokenizer", "bytes"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--max-tokens", "-5"), ("--max-tokens", "0"), ("--batch-size", "0"),
                                         ("--seq-len", "0")])
def test_argument_ranges_are_refused_before_any_output(run_dir, jsonl, flag, value, capsys):
    args = ["--checkpoint", str(run_dir), "--data", str(jsonl), "--tokenizer", "bytes", flag, value]
    assert eval_main(args) == 2  # progress left on: nothing but the error line may be printed
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [err.strip()], err
    assert err.startswith(f"mohge-eval: usage error: {flag}: must be >= 1 (got {value})"), err


@pytest.mark.parametrize("flag, value, says", [("--device", "foo", "not a torch device"),
                                               ("--json", "/nonexistent-dir/r.json", "its directory does not exist")])
def test_bad_device_and_json_path_are_refused_before_any_work(run_dir, jsonl, flag, value, says, capsys):
    assert eval_main(["--checkpoint", str(run_dir), "--data", str(jsonl), "--tokenizer", "bytes", flag, value]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == err.strip().splitlines()[0], err
    assert err.startswith(f"mohge-eval: usage error: {flag} {value}: {says}"), err


def test_input_errors_come_before_any_progress_output(run_dir, jsonl, tmp_path, capsys):
    base = ["--checkpoint", str(run_dir)]
    for extra in (["--data", str(jsonl), str(tmp_path / "missing.jsonl"), "--tokenizer", "bytes"],
                  ["--data", str(jsonl), "--tokenizer", str(tmp_path / "none.json")],
                  ["--data", str(jsonl)]):
        assert eval_main([*base, *extra]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.splitlines() == [err.strip()], err  # no progress bar before it
        assert err.startswith("mohge-eval: data error: --"), err


def test_tokenizer_spellings_match_mohge_convert(run_dir, jsonl, tmp_path, monkeypatch, capsys):
    import mohge.data.embedded as embedded
    from mohge.data.train_tokenizer import train_bpe

    monkeypatch.setattr(embedded, "default_dir", lambda: tmp_path / "embedded")
    args = ["--checkpoint", str(run_dir), "--data", str(jsonl), "--no-progress", "--seq-len", "16"]
    assert eval_main([*args, "--tokenizer", "embedded"]) == 2  # not prepared yet: says how
    assert "mohge-prepare-demo" in capsys.readouterr().err
    train_bpe([str(jsonl)], 258, str(tmp_path / "embedded"))  # 258 <= the run's vocab of 260
    for spelling in ("embedded", str(tmp_path / "embedded"), str(tmp_path / "embedded" / "tokenizer.json")):
        assert eval_main([*args, "--tokenizer", spelling, "--json", str(tmp_path / "r.json")]) == 0, spelling
        results = json.loads((tmp_path / "r.json").read_text())
        assert results.pop("data") == [str(jsonl)]
        if spelling == "embedded":
            first = results
        assert results == first
    assert first["tokens"] > 0
    capsys.readouterr()
