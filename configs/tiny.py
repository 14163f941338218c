"""The offline demo: a real distillation on a laptop-class CPU, with no network.

    make demo        # = python -m distil_jax.train --config configs/tiny.py --workdir runs/demo

1. distil_jax writes a corpus of the Python standard library's docstrings (every machine with
   Python has it), trains a 4096-token byte-level BPE on it, and trains a 4-layer GPT-2 teacher
   (128 wide, 400 steps) with the next-token loss: WORKDIR/teacher, an ordinary HF folder. The
   teacher is also cached outside the workdir, keyed by its recipe ($DISTIL_JAX_CACHE, default
   ~/.cache/distil_jax/demo_teacher/), so a second demo, in any workdir, skips this step.
2. It distills a 2-layer student from that teacher with the reference objective (KL on the
   logits + 5.0 x MSE of layer-2 attention maps through the teacher-only affine LayerNorm and the
   orthogonal projector), Adam with linear decay, packed rows of 128 tokens, 120 steps. The
   student's two blocks start as the teacher's first and last (init_from_teacher_layers, as
   distilgpt2 was made), which brings it within a few percent of the teacher's perplexity in
   those steps.
3. It prints teacher / student-at-start / student-at-end held-out perplexity, parameters and
   tokens/s. The measured times and perplexities are in the README's demo table.

`get_config("test")` is the seconds-long variant the end-to-end tests use.
"""

from distil_jax.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.demo_teacher.enabled = True
    c.teacher.model_name_or_path = ""  # "": the demo teacher in WORKDIR/teacher
    c.teacher.dtype = "float32"
    c.dataset.uri = ""  # "": the stdlib docstring corpus in WORKDIR/data
    c.dataset.subset = None
    c.dataset.sample_size = None
    c.dataset.test_size = 0.05
    c.dataset.max_seq_len = 128
    # The demo keeps every token (documents concatenated with EOS and cut into rows) and trains
    # the objective's parameters with the student's settings, as it did before those options
    # existed, so that its measured figures (README) still hold.
    c.dataset.truncate = False
    c.dataset.append_eos = True
    c.optimizer.objective_learning_rate = None
    c.optimizer.objective_weight_decay = None
    c.optimizer.objective_clip = True
    # 400 steps (about 1.5 epochs) at 5e-3: the teacher's own training is most of a first demo's
    # time (the README's demo table has the trade measured).
    c.demo_teacher.update(n_layer=4, n_embd=128, n_head=4, n_positions=128, steps=400,
                          batch_size=16, learning_rate=5e-3)
    c.student.config_name_or_path = ""  # the teacher's config with overrides
    c.student.overrides = {"n_layer": 2}
    c.student.init_from_teacher_layers = "uniform"  # teacher blocks [0, 3]
    c.student.dropout = False
    c.train.dtype = "float32"  # bf16 is slower than f32 on most CPUs
    c.train.remat = False
    c.train.batch_size = 16
    c.train.max_steps = 120  # about half an epoch: with the teacher's blocks, enough to match it
    c.train.log_steps = 10
    c.train.save_steps = 100
    c.eval.eval_steps = 0
    c.eval.batch_size = 16
    c.optimizer.learning_rate = 1e-3
    if arg == "test":
        # Seconds: a 2-layer teacher, 64 wide, a 512-token vocabulary, 60 docs, rows of 32.
        c.demo_teacher.update(vocab_size=512, n_layer=2, n_embd=64, n_head=4, n_positions=32,
                              steps=60, batch_size=8, learning_rate=3e-3)
        c.dataset.sample_size = 60
        c.dataset.test_size = 0.1
        c.dataset.max_seq_len = 32
        c.student.overrides = {"n_layer": 1}
        c.student.init_from_teacher_layers = None  # the tests distill from a random student
        c.objective.attn.layer_mapper = "last"
        c.train.batch_size = 8
        c.train.max_steps = 30
        c.train.log_steps = 5
        c.train.save_steps = 10
        c.eval.batch_size = 8
        c.optimizer.learning_rate = 3e-3
    return c
