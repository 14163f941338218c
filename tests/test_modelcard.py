"""The model card: never crashes on missing records, bolds the lowest perplexity, real figures."""

import re

import pytest
import yaml

from distil_jax.modelcard import NOT_RECORDED, model_card, module_summary
from distil_jax import models
from distil_jax.models.gpt2 import GPT2Config

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
    assert meta["library_name"] == "distil_jax" and "distillation" in meta["tags"]
    assert "base_model" not in meta and "datasets" not in meta
    assert ("license" in meta) == bool(config and config.get("license"))
    sections = ["Summary", "Architecture", "Evaluation", "Resource usage", "Teacher → student",
                "Train dataset", "Training objective", "Framework versions"]
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


def test_real_figures_and_module_diff():
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
    # Module summaries: totals are the real counts; the diff shows 4 blocks -> 2 blocks.
    s_tree = module_summary(STUDENT_CFG)
    total = int(s_tree.splitlines()[-1].split()[-1].replace(",", ""))
    assert total == models.param_count(GPT2Config(**{k: v for k, v in STUDENT_CFG.items() if k != "model_type"}))
    assert "-  transformer.h.0-3 (4 blocks, each" in card and "+  transformer.h.0-1 (2 blocks, each" in card


def test_intermediate_step_export_is_flagged():
    card = model_card(_summary(), {}, export={"step": 5})
    assert "not the end of the run (step 12)" in card
