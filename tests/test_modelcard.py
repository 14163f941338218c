"""The model card: never crashes on missing records, bolds the lowest perplexity, real figures,
hub metadata that huggingface_hub parses back, a license only where one is stated."""

import json
import re

import pytest
import yaml
from huggingface_hub import ModelCard

from distil_jax.hf import teacher_license
from distil_jax.modelcard import NOT_RECORDED, model_card
from distil_jax import models

TEACHER_CFG = dict(model_type="gpt2", n_layer=4, n_embd=32, n_head=4, vocab_size=101, n_positions=32)
STUDENT_CFG = dict(TEACHER_CFG, n_layer=2)


def _front_matter(card: str) -> dict:
    m = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1))


def _summary(**evaluation):
    return {
        "teacher": {"name_or_path": "gpt2", "params": 111, "n_layer": 4, "config": TEACHER_CFG},
        "student": {"params": 77, "n_layer": 2, "config": STUDENT_CFG},
        "steps": 12,
        "evaluation": evaluation or {
            "heldout": {"teacher": {"ppl": 30.25, "distily_ppl": 41.5, "tokens": 900, "documents": 10},
                        "student_start": {"ppl": 5123.75, "distily_ppl": 6000.5, "tokens": 900, "documents": 10},
                        "student_end": {"ppl": 150.5, "distily_ppl": 210.25, "tokens": 900, "documents": 10}},
        },
    }


@pytest.mark.parametrize("summary,config", [({}, {}), (None, None), ({}, {"license": "mit"})])
def test_empty_records_never_crash(summary, config):
    card = model_card(summary, config)
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"distillation", "distil_jax"} <= set(meta["tags"])
    assert "base_model" not in meta and "datasets" not in meta and "model-index" not in meta
    assert meta.get("license") == (config or {}).get("license")  # never invented
    sections = ["Summary", "Architecture", "Evaluation", "Resource usage", "Train dataset",
                "Training objective", "Framework versions"]
    if not config:
        sections.append("Hyperparameters")
    for section in sections:
        body = card.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
        assert NOT_RECORDED in body, section
    assert "could not be rendered" not in card


def test_malformed_records_never_crash():
    summary = {"evaluation": ["not", "a", "dict"], "resources": "oops", "dataset": {"train": 3},
               "teacher": {"config": {"model_type": "llama"}}, "student": 5, "versions": None,
               "steps": "many"}
    card = model_card(summary, {"objective": 7, "train": None})
    assert card.startswith("---\n") and "## Framework versions" in card


def test_metadata_that_cannot_be_built_falls_back_to_the_least():
    """A downstream row whose task is not text: huggingface_hub cannot write its model-index, and
    the card keeps the least hub metadata (parsed back by huggingface_hub) and every section."""
    row = {"task": ["not", "text"], "metric": "acc", "teacher": 0.6, "student": 0.5, "ratio": 0.83, "dataset": "json"}
    card = model_card(_summary(), {}, export={"step": 12}, downstream={"student": {"step": 12}, "rows": [row]})
    assert ModelCard(card).data.to_dict() == {"library_name": "transformers", "tags": ["distillation", "distil_jax"]}
    assert "could not be rendered" not in card and "student, end of training" in card


def test_best_perplexity_is_the_lowest_and_bold():
    card = model_card(_summary(), {})
    ev = card.split("## Evaluation\n", 1)[1].split("\n## ", 1)[0]
    token_table, distily_table = ev.split("Distily's perplexity", 1)
    assert "**30.25**" in token_table  # the teacher's: the lowest
    assert "**150.50**" not in token_table and "**5,123.75**" not in token_table
    assert "150.50" in token_table and "5,123.75" in token_table  # shown, not bold
    assert "**41.50**" in distily_table and "**6,000.50**" not in distily_table
    assert "lower is better" in ev.lower() and "token-weighted" in ev


def test_best_is_per_column_and_student_can_win():
    s = _summary(
        heldout={"teacher": {"ppl": 20.0}, "student_end": {"ppl": 10.0}},
        other={"teacher": {"ppl": 3.0}, "student_end": {"ppl": 4.0}},
    )
    ev = model_card(s, {}).split("## Evaluation\n", 1)[1].split("\n## ", 1)[0]
    assert "| model | heldout | other |" in ev
    teacher = next(line for line in ev.splitlines() if line.startswith("| teacher (gpt2)"))
    student = next(line for line in ev.splitlines() if line.startswith("| student, end of training (step 12)"))
    assert "| 20.00 |" in teacher and "**10.00**" in student  # heldout: student best
    assert "**3.0000**" in teacher and "| 4.0000 |" in student  # other: teacher best


def test_real_figures_and_shapes():
    config = {"license": "apache-2.0", "objective": {"logits": {"weight": 1.0, "loss_fn": "kl"},
                                                     "attn": {"weight": 5.0, "loss_fn": "raw_mse"}},
              "train": {"batch_size": 8}, "hub": {"hf_token": "hf_SECRET123"}}
    card = model_card(_summary(), config, export={"step": 12, "dtype": "float32", "weight_bytes": 308},
                      model_name="me/student")
    meta = _front_matter(card)
    assert meta["base_model"] == "gpt2" and meta["license"] == "apache-2.0"
    assert "# me/student" in card and "from_pretrained('me/student')" in card
    assert "| train.batch_size | 8 |" in card
    assert "hf_SECRET123" not in card and "<redacted>" in card
    assert "logits: kl × 1; attn: raw_mse × 5" in card
    # The teacher -> student table: the recorded configs' shapes side by side, with their ratio.
    assert "| class | GPT2LMHeadModel | GPT2LMHeadModel |" in card
    assert "| layers | 4 | 2 | 0.500 |" in card and "| width | 32 | 32 | 1.000 |" in card
    assert "| parameters | 111 | 77 | 0.694 |" in card and "| size of the weights (this export) |  | 308 bytes" in card


def test_intermediate_step_export_is_flagged():
    card = model_card(_summary(), {}, export={"step": 5})
    assert "not the end of the run (step 12)" in card


def test_metadata_round_trips_through_huggingface_hub():
    """huggingface_hub's own parser reads the front matter back, model-index included; the
    perplexity results are the student's end-of-run figures, only on the weights they measured."""
    s = _summary(heldout={"teacher": {"ppl": 30.25}, "student_end": {"ppl": 150.5}},
                 other={"student_end": {"ppl": float("nan")}})
    config = {"dataset": {"uri": "wikimedia/wikipedia"}}
    card = ModelCard(model_card(s, config, export={"step": 12}, model_name="me/student"))
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.base_model) == ("transformers", "text-generation", "gpt2")
    assert data.datasets == ["wikimedia/wikipedia"] and {"distillation", "distil_jax"} <= set(data.tags)
    assert data.model_name == "me/student"
    (result,) = data.eval_results  # the nan is no result
    assert (result.metric_type, result.metric_value, result.dataset_type, result.task_type) == \
        ("perplexity", 150.5, "wikimedia/wikipedia", "text-generation")
    assert card.text.lstrip().startswith("# me/student")
    # An earlier step's export: the end-of-run figures were measured on other weights.
    assert ModelCard(model_card(s, config, export={"step": 5})).data.eval_results is None
    # A local file's loader ("json") is no hub dataset: the result names the evaluator instead.
    (local,) = ModelCard(model_card(s, {"dataset": {"uri": "json"}}, export={"step": 12})).data.eval_results
    assert (local.dataset_type, local.dataset_name) == ("heldout", "heldout")


def test_license_is_stated_never_invented(tmp_path):
    """The teacher's card (README.md front matter) or config.json gives the license; a teacher
    that states none gets none; the run's config (`license`) overrides both."""
    stated = tmp_path / "stated"
    stated.mkdir()
    (stated / "README.md").write_text("---\nlicense: other\nlicense_name: llama3.2\n"
                                      "license_link: LICENSE.txt\n---\n# a teacher\n")
    in_config = tmp_path / "in_config"
    in_config.mkdir()
    (in_config / "config.json").write_text(json.dumps({"model_type": "gpt2", "license": "mit"}))
    silent = tmp_path / "silent"
    silent.mkdir()
    (silent / "README.md").write_text("# a teacher, no front matter\n")
    (silent / "config.json").write_text("{}")
    assert teacher_license(stated) == {"license": "other", "license_name": "llama3.2", "license_link": "LICENSE.txt"}
    assert teacher_license(in_config) == {"license": "mit"}
    assert teacher_license(silent) is None and teacher_license(tmp_path / "absent") is None
    assert teacher_license("org/never-downloaded") is None  # the tests run offline: the cache only
    meta = _front_matter(model_card({}, {}, export={"teacher_license": teacher_license(stated)}))
    assert (meta["license"], meta["license_name"]) == ("other", "llama3.2")
    meta = _front_matter(model_card({}, {"license": "apache-2.0"}, export={"teacher_license": {"license": "mit"}}))
    assert meta["license"] == "apache-2.0"
    assert "license" not in _front_matter(model_card({}, {"license": ""}, export={"teacher_license": None}))


@pytest.mark.parametrize("hf_config", [
    dict(TEACHER_CFG, n_layer=2),
    dict(model_type="qwen3", vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
         tie_word_embeddings=False),
    dict(model_type="qwen2", vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)])
def test_parameters_listed_in_the_models_own_order(hf_config):
    """The family's MODULE_ORDER puts the parameters in transformers' own order (its state dict's:
    embeddings, each block's modules, the final norm, the head); qwen2 adds q/k/v biases, qwen3
    q/k norms and an untied head."""
    import torch  # noqa: F401  (transformers' models)
    import transformers
    from flax import traverse_util

    cfg = models.config_from_hf(hf_config)
    fam = models.family(cfg)
    ours = sorted((fam.path_to_hf(p) for p in traverse_util.flatten_dict(models.hf_param_shapes(cfg))),
                  key=lambda n: models.hf_order(cfg, n))
    theirs = [n for n, _ in transformers.AutoModelForCausalLM.from_config(models.config_to_hf(cfg)).named_parameters()]
    assert ours == theirs


def test_downstream_results_only_for_the_weights_they_measured():
    """evals_downstream.json's student figures go in the model-index (as huggingface_hub reads
    it back) only when they were measured on an export of this step; the table always shows."""
    downstream = {"lm_eval_version": "0.4.13", "student": {"model": "out", "step": 12},
                  "rows": [dict(task="hellaswag", metric="acc_norm", teacher=0.5, student=0.25, ratio=0.5,
                                higher_is_better=True, num_fewshot=0, dataset="Rowan/hellaswag"),
                           dict(task="mine", metric="acc", teacher=0.8, student=float("nan"), ratio=None,
                                higher_is_better=True, num_fewshot=5, dataset="json")]}
    card = ModelCard(model_card(_summary(), {}, export={"step": 12}, downstream=downstream, model_name="me/s"))
    (ppl, acc) = card.data.eval_results  # the nan is no result
    assert (acc.dataset_type, acc.dataset_name, acc.metric_type, acc.metric_value, acc.source_name) == \
        ("Rowan/hellaswag", "hellaswag", "acc_norm", 0.25, "lm-evaluation-harness")
    assert ppl.metric_type == "perplexity" and "| hellaswag | acc_norm ↑ | 0.5 | 0.25 | 0.5 |" in card.text
    other = ModelCard(model_card(_summary(), {}, export={"step": 5}, downstream=downstream))
    assert other.data.eval_results is None and "(not this export's weights)" in other.text
