"""A Llama-family distillation from the command line, end to end, on local folders only.

A tiny random `transformers.LlamaForCausalLM` teacher (grouped-query attention, untied head) with a
tokenizer trained on the stdlib-docstring corpus is distilled into a 2-layer student whose blocks
start from the teacher's ("uniform"); the CLI run is killed with SIGKILL after its first
checkpoint and resumed, the result equals an uninterrupted run bitwise, and the export loads in
transformers as a LlamaForCausalLM whose logits equal the JAX student's (float32, 1e-5).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from distil_jax import checkpoint, demo, export as export_lib, hf, models
from distil_jax.demo import corpus
from tests import tiny_setup as T

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # float32 max abs logit difference, export vs the JAX student


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(teacher folder, corpus file): a random Llama teacher saved with save_pretrained."""
    root = tmp_path_factory.mktemp("llama_inputs")
    data = demo.ensure_corpus(root)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()[:300]]
    tokenizer = corpus.train_tokenizer(texts, vocab_size=384, model_max_length=64)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    teacher = root / "teacher"
    transformers.LlamaForCausalLM(cfg).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    return teacher, data


CONFIG = """
import importlib.util
spec = importlib.util.spec_from_file_location("tiny", {tiny!r})
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)


def get_config():
    c = tiny.get_config("test")
    c.demo_teacher.enabled = False
    c.teacher.model_name_or_path = {teacher!r}
    c.dataset.uri = {data!r}
    c.dataset.sample_size = 40
    c.student.overrides = {{"num_hidden_layers": 2}}
    c.student.init_from_teacher_layers = "uniform"
    c.train.max_steps = 20
    c.train.save_steps = 10
    return c
"""


@pytest.mark.slow
def test_llama_cli_kill_resume_export(inputs, tmp_path):
    teacher, data = inputs
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    config = tmp_path / "llama_tiny.py"
    config.write_text(CONFIG.format(tiny=str(ROOT / "configs" / "tiny.py"), teacher=str(teacher),
                                    data=str(data)))
    cmd = lambda w: [sys.executable, "-m", "distil_jax.train", "--config", str(config),  # noqa: E731
                     "--workdir", str(w)]

    whole = tmp_path / "whole"
    done = subprocess.run(cmd(whole), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(llama): 4 layers" in done.stderr  # the log names the family

    killed = tmp_path / "killed"
    proc = T.start_until_checkpoint(cmd(killed), killed, 10, ROOT, timeout=600)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.available_steps(killed)[-1] < 20
    done = subprocess.run(cmd(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from the checkpoint at step" in done.stderr

    step_a, a = checkpoint.restore_params(killed)
    step_b, b = checkpoint.restore_params(whole)
    assert step_a == step_b == 20
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)

    # The student started from teacher blocks 0 and 3 and is a Llama with 2 layers.
    s_cfg = hf.load_config(killed / "student")
    assert (s_cfg.model_type, s_cfg.num_layers, s_cfg.num_kv_heads) == ("llama", 2, 2)

    out = export_lib.export(killed, tmp_path / "export")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=False)
    assert type(model).__name__ == "LlamaForCausalLM"
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = np.random.RandomState(0).randint(1, s_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model.eval()(torch.as_tensor(ids)).logits.numpy()
    mine = models.forward(s_cfg, a["student"], ids).logits
    assert float(np.max(np.abs(np.asarray(mine) - ref))) < TOL
    card = (out / "README.md").read_text()
    assert "LlamaForCausalLM" in card and "key/value heads" in card
