"""Downstream evaluation, offline: two custom lm-eval tasks over a local jsonl (a multiple choice
and a loglikelihood task on docstring-like prompts) on the demo teacher and its exported student;
the harness's figures equal a direct computation with transformers on the same models."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import transformers

from distil_jax import evaluate as evaluate_lib
from tests import tiny_setup
from tests.test_export import _tiny_config

os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")  # the hub is never reached

PPL_RTOL = 1e-4  # lm-eval's batched, padded float32 forward vs one unpadded sequence at a time
QUESTIONS = [  # (prompt, choices, answer)
    ("Return the length of", ["the object.", "a banana.", "the sky blue."], 0),
    ("Open a file and return a", ["stream.", "tree.", "dog."], 0),
    ("Raise an exception if the", ["mountain sings.", "value is invalid.", "car is red."], 1),
    ("Return a new list containing all items from the", ["ocean.", "happy cat.", "iterable."], 2),
    ("Convert a string to an", ["integer.", "elephant.", "orange sky."], 0),
    ("Return True if the object is", ["callable.", "purple rain.", "a fish."], 0),
    ("Create a new thread and", ["start it.", "eat it.", "sing it."], 0),
    ("Remove and return an item from the", ["dance floor.", "queue.", "moonlight."], 1),
    ("Return the absolute value of the", ["weather.", "argument.", "sandwich."], 1),
    ("Read at most size bytes from the", ["banana.", "garden.", "file."], 2),
]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{question}}}}"
"""
MC = "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n" \
     "metric_list:\n  - metric: acc\n"
LL = "output_type: loglikelihood\ndoc_to_target: \"{{choices[answer]}}\"\n" \
     "metric_list:\n  - metric: perplexity\n  - metric: acc\n"


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    data = d / "docstrings.jsonl"
    data.write_text("".join(json.dumps(dict(question=q, choices=c, answer=a)) + "\n" for q, c, a in QUESTIONS))
    (d / "docstring_mc.yaml").write_text(TASK.format(name="docstring_mc", data=data) + MC)
    (d / "docstring_ll.yaml").write_text(TASK.format(name="docstring_ll", data=data) + LL)
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real tiny distillation run (the demo teacher, 30 steps) and its export."""
    return tiny_setup.run_and_export(tmp_path_factory, _tiny_config())


@pytest.fixture(scope="module")
def evaluated(run, tasks_dir):
    workdir, out = run
    argv = ["--workdir", str(workdir), "--student", str(out), "--tasks", "docstring_mc,docstring_ll",
            "--include-path", str(tasks_dir), "--batch-size", "4",
            "--bootstrap-iters", "0"]  # no forked bootstrap pool inside a JAX-threaded test process
    assert evaluate_lib.main(argv) == 0
    return json.loads((workdir / evaluate_lib.RESULTS_FILE).read_text())


def _logprob(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), the continuation's tokens being those of
    context + continuation after the context's (as lm-eval splits them)."""
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    assert whole[:len(ctx)] == ctx
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def _direct(folder):
    """(multiple-choice accuracy, loglikelihood-task perplexity) computed with transformers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    correct, gold_ll = [], []
    for q, choices, answer in QUESTIONS:
        # multiple_choice puts the task's target_delimiter (" ") before each choice; a
        # loglikelihood task scores its target right after the prompt, as written.
        lls = [_logprob(model, tok, q, " " + c) for c in choices]
        correct.append(int(np.argmax(lls)) == answer)
        gold_ll.append(_logprob(model, tok, q, choices[answer]))
    return float(np.mean(correct)), math.exp(-np.mean(gold_ll))


@pytest.mark.slow
def test_figures_equal_a_direct_computation(run, evaluated):
    workdir, out = run
    rows = {(r["task"], r["metric"]): r for r in evaluated["rows"]}
    assert set(rows) == {("docstring_mc", "acc"), ("docstring_ll", "perplexity"), ("docstring_ll", "acc")}
    for who, folder in (("teacher", workdir / "teacher"), ("student", out)):
        acc, ppl = _direct(folder)
        assert rows["docstring_mc", "acc"][who] == acc, who
        assert rows["docstring_ll", "perplexity"][who] == pytest.approx(ppl, rel=PPL_RTOL), who
    ppl = rows["docstring_ll", "perplexity"]
    assert ppl["teacher"] != ppl["student"]  # two models really ran
    assert ppl["ratio"] == pytest.approx(ppl["student"] / ppl["teacher"], rel=1e-12)
    assert ppl["higher_is_better"] is False and rows["docstring_mc", "acc"]["higher_is_better"] is True
    assert evaluated["student"] == {"model": str(out), "step": 30}
    assert evaluated["teacher"] == {"model": str(workdir / "teacher")}  # the demo's, found by default


@pytest.mark.slow
def test_markdown_table_is_printed(evaluated, capsys):
    table = evaluate_lib.markdown(evaluated["rows"])
    assert table.splitlines()[0] == "| task | metric | teacher | student | student / teacher |"
    assert len(table.splitlines()) == 2 + len(evaluated["rows"])
    assert "| docstring_ll | perplexity ↓ |" in table


@pytest.mark.slow
def test_export_puts_the_results_in_the_model_index(run, evaluated, tmp_path):
    """An export after the evaluation: the student's figures are model-index results that
    huggingface_hub parses back into ModelCardData; an export of another step leaves them out."""
    from huggingface_hub import ModelCardData, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from distil_jax.export import export

    workdir, _ = run
    out = export(workdir, tmp_path / "card", model_name="me/student")
    meta = metadata_load(out / "README.md")
    data = ModelCardData(**meta)  # the round trip the hub's own loader does
    assert (data.library_name, data.pipeline_tag) == ("transformers", "text-generation")
    assert {"distil_jax", "distillation"} <= set(data.tags) and data.model_name == "me/student"
    name, results = model_index_to_eval_results(meta["model-index"])
    got = {(r.dataset_name, r.metric_type): r.metric_value for r in results}
    summary = json.loads((workdir / "run_summary.json").read_text())
    assert got.pop(("heldout", "perplexity")) == summary["evaluation"]["heldout"]["student_end"]["ppl"]
    assert got == {(r["task"], r["metric"]): r["student"] for r in evaluated["rows"]}
    assert all(r.source_name == "lm-evaluation-harness" for r in results if r.dataset_name != "heldout")
    assert evaluate_lib.markdown(evaluated["rows"]) in (out / "README.md").read_text()
    earlier = export(workdir, tmp_path / "step20", step=20, model_name="me/student")
    assert "model-index" not in metadata_load(earlier / "README.md")
    assert "(not this export's weights)" in (earlier / "README.md").read_text()


def test_help_exits_0(capsys):
    assert evaluate_lib.main(["--help"]) == 0
    assert "--include-path" in capsys.readouterr().out


def test_missing_lm_eval_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    assert evaluate_lib.main(["--workdir", str(tmp_path), "--student", str(tmp_path), "--tasks", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install distil_jax[eval]" in err


@pytest.mark.slow
def test_unknown_task_and_non_export_student(run, tasks_dir, tmp_path, capsys):
    workdir, out = run
    base = ["--workdir", str(workdir), "--include-path", str(tasks_dir)]
    assert evaluate_lib.main(base + ["--student", str(out), "--tasks", "docstring_m"]) == 2
    assert "did you mean 'docstring_mc'" in capsys.readouterr().err
    assert evaluate_lib.main(base + ["--student", str(workdir / "teacher"), "--tasks", "docstring_mc"]) == 2
    assert "not an export folder" in capsys.readouterr().err
