"""On-policy distillation (GKD) on the offline demo's corpus, small enough for a CPU in minutes:
a 2-layer teacher (64 wide, 512-token vocabulary) trained on 300 docstrings, a 1-layer student,
rows of 64 tokens. docs/on_policy.md compares its two variants (tools/compare_on_policy.py):

    python -m distil_jax.train --config configs/on_policy.py --workdir runs/on_policy      # lmbda 1
    python -m distil_jax.train --config configs/on_policy.py:off --workdir runs/off_policy  # lmbda 0

Both run the same steps on the same batches (on-policy steps replace each row by its first 16
tokens and 32 tokens the student samples); the objective is the logits KL alone (GKD's beta = 0).
"""

from pathlib import Path

from distil_jax import config as config_lib


def get_config(arg: str = ""):
    c = config_lib.load(str(Path(__file__).with_name("tiny.py")) + ":test")
    c.demo_teacher.update(n_positions=64, steps=300, batch_size=16)
    c.dataset.sample_size = 300
    c.dataset.max_seq_len = 64
    c.objective.attn.weight = 0.0  # the logits loss alone, as GKD
    c.train.max_steps = 100
    c.train.log_steps = 10
    c.train.save_steps = 50
    c.objective.on_policy.update(lmbda=0.0 if arg == "off" else 1.0, prompt_tokens=16,
                                 max_new_tokens=32, temperature=1.0)
    return c
