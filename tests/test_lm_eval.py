"""lm-eval on a mohge export (model `hf`, trust_remote_code) with the bundled offline task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs `pip install 'mohge[hf]'`")
lm_eval = pytest.importorskip("lm_eval", reason="needs `pip install 'mohge[hf]'`")

from mohge.data.train_tokenizer import train_bpe  # noqa: E402
from mohge.launch.convert import main as convert_main  # noqa: E402
from mohge.train.hydra_config import compose_config  # noqa: E402
from mohge.train.trainer import train  # noqa: E402

TASKS = Path(__file__).parents[1] / "launch" / "lm_eval_tasks"


@pytest.mark.slow
def test_lm_eval_scores_the_export_with_its_own_loglikelihoods(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    items = [json.loads(line) for line in (TASKS / "kjv_cloze.jsonl").read_text().splitlines()]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i['question']} {c}"}) + "\n" for i in items for c in i["choices"]))
    train_bpe([str(corpus)], 300, str(tmp_path / "tok"), min_frequency=1)
    train(compose_config("tiny_mohge", ["data=synthetic", "logging.progress=false", "train.eval_every=0",
                                        "train.steps=2", "model.vocab_size=300", f"out_dir={tmp_path / 'run'}"]))
    assert convert_main(["to-hf", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf"),
                         "--tokenizer", str(tmp_path / "tok")]) == 0
    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS, tasks)
    yaml = tasks / "kjv_cloze.yaml"
    yaml.write_text(yaml.read_text().replace("launch/lm_eval_tasks/kjv_cloze.jsonl", str(tasks / "kjv_cloze.jsonl")))

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "hf"), "trust_remote_code": True,
                                                  "dtype": "float32"},
                          tasks=["kjv_cloze"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                          batch_size=4, device="cpu")
    got = [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(out["samples"]["kjv_cloze"], key=lambda s: s["doc_id"])]

    # reference: the export's own log-likelihood of each choice after its question
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    want, correct = [], 0
    for item in items:
        context = tok(item["question"])["input_ids"]
        lls = []
        for choice in item["choices"]:
            whole = tok(item["question"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            lls.append(float(sum(logp[i - 1, whole[i]] for i in range(len(context), len(whole)))))
        want.append(lls)
        correct += int(max(range(len(lls)), key=lls.__getitem__) == item["answer"])
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
    assert out["results"]["kjv_cloze"]["acc,none"] == pytest.approx(correct / len(items))

    # the registered `mohge` model scores the DCP checkpoint directly, with the same numbers
    from mohge.launch.lm_eval_adapter import register

    register()
    direct = simple_evaluate(model="mohge", model_args={"checkpoint": str(tmp_path / "run"),
                                                        "tokenizer": str(tmp_path / "tok")},
                             tasks=["kjv_cloze"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                             batch_size=4)
    again = [[float(r[0]) for r in s["filtered_resps"]]
             for s in sorted(direct["samples"]["kjv_cloze"], key=lambda s: s["doc_id"])]
    for g, w in zip(again, want):
        assert g == pytest.approx(w, abs=1e-4)
