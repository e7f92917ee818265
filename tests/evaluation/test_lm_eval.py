"""lm-evaluation-harness on an exported tiny model, fully offline: `sessa-scale eval RUN --task lm-eval`
scores two local tasks (YAML + JSONL written here) through the harness's `hf` model type, and its
scores equal the ones computed directly from sessa_scale's model (log-likelihoods of the choices;
greedy generations, in left-padded batches of 2). Skipped without the `lm-eval` extra."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs the lm-eval extra: pip install -e '.[lm-eval]'")
pytest.importorskip("transformers", reason="needs the lm-eval extra: pip install -e '.[lm-eval]'")

from sessa_scale.cli import main  # noqa: E402
from sessa_scale.data import ByteTokenizer  # noqa: E402
from sessa_scale.checkpoint.merge import load_model  # noqa: E402
from tests.helpers import REPO_ROOT as ROOT  # noqa: E402
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=32", "data.corpus_bytes=200000",
    "train.micro_batch_size=4", "train.max_steps=30", "train.eval_interval=0", "optim.warmup_steps=3",
    "logging.progress=false",
]  # fmt: skip
PROMPTS = ["def f(x):\n    return", "import o", "for i in range(1", "class Foo", "    if x is Non", "self.", "return"]
MAX_GEN = 6

CHOICE_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""
GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen}
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens)[0, :-1].double(), dim=-1)
    return sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation))


@pytest.mark.slow
def test_lm_eval_scores_local_tasks_as_our_model_does(tmp_path):
    run = tmp_path / "run"
    assert main(["train", f"run.dir={run}", *TINY]) == 0
    model, _, _ = load_model(run)
    tok = ByteTokenizer()
    records, correct_choice, correct_gen = [], 0, 0
    for i, prompt in enumerate(PROMPTS):
        context = [tok.eos_id, *tok.encode(prompt)]  # the exported tokenizer puts EOS before a text
        generated = model.generate(torch.tensor([context]), MAX_GEN, temperature=0)[0, len(context) :].tolist()
        continuation = tok.decode(generated).split("\n")[0]
        answer = continuation if i % 2 == 0 else continuation + "#"  # every other record cannot match
        correct_gen += answer == continuation
        choices = [continuation or "x", "@#!"] if i % 3 else ["@#!", continuation or "x"]
        lls = [_loglikelihood(model, context, tok.encode(c)) for c in choices]
        label = i % 2
        correct_choice += max(range(2), key=lambda j: lls[j]) == label
        records.append({"prompt": prompt, "choices": choices, "label": label, "answer": answer})
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tasks / "choice.yaml").write_text(CHOICE_TASK.format(data=tasks / "data.jsonl"))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=tasks / "data.jsonl", max_gen=MAX_GEN))

    # offline; and without the rendezvous variables this process's in-process training set (a child that
    # inherits them would try to join a process group on a port this process holds)
    rendezvous = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    offline = {**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    argv = [sys.executable, "-m", "sessa_scale", "eval", str(run), "--task", "lm-eval", "--lm-eval-tasks", "tiny_choice,tiny_gen",
            "--lm-eval-include", str(tasks), "--batch-size", "2", "--device", "cpu", "--json"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=offline, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result["results"]["tiny_choice"]["acc,none"] == pytest.approx(correct_choice / len(PROMPTS), abs=1e-12)
    assert result["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(correct_gen / len(PROMPTS), abs=1e-12)
    assert result["n-samples"]["tiny_gen"]["effective"] == len(PROMPTS) and result["step"] == 30
    assert json.loads((run / "eval" / "lm-eval.json").read_text()) == result
    assert "tiny_choice" in result["table"] and "exact_match" in result["table"]


def test_lm_eval_task_errors_are_user_errors(tmp_path, capsys):
    (tmp_path / "tasks").mkdir()
    assert main(["eval", str(tmp_path), "--task", "lm-eval", "--lm-eval-tasks", "x"]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err  # the checkpoint is checked before the harness loads
