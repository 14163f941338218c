"""A chat model from your conversations: Qwen2.5-1.5B-Instruct distilled into a 14-layer student
of its own family on HuggingFaceH4/ultrachat_200k, the losses on the assistant turns only.

    python -m distil_jax.train --config configs/chat.py --workdir runs/chat

What it trains: teacher `Qwen/Qwen2.5-1.5B-Instruct` (28 layers); the student is the teacher's
config with 14 layers, its blocks initialized from 14 evenly spaced teacher blocks and the
teacher's LM head (= its tied token embedding) copied in, as distilgpt2 was made. The data is
20,000 conversations streamed from ultrachat_200k's `train_sft` split (the `messages` column,
rendered with the teacher tokenizer's chat template), 1 % held out; `dataset.loss_on =
"completion"` counts only the positions that predict assistant tokens in every loss and in the
held-out perplexity (docs/usage.md, "Chat models"). Objective: KL on the logits (a student with
the teacher's width and heads could add `attn` / `hs`; the attention maps of 2048-token rows are
large).

Your own conversations: `--config.dataset.uri=path/to/chats.jsonl` (one {"messages": [...]}
per line; `--config.dataset.split=train --config.dataset.streaming=False`).

Needs the Hugging Face hub (the teacher, the dataset) and a GPU; tests/test_chat.py trains a
variant of it on a tiny local Qwen2 teacher.
"""

from distil_jax.config import default_config


def get_config():
    c = default_config()
    c.teacher.model_name_or_path = "Qwen/Qwen2.5-1.5B-Instruct"
    c.student.config_name_or_path = ""  # the teacher's config with the overrides below
    c.student.overrides = {"num_hidden_layers": 14}
    c.student.init_from_teacher_layers = "uniform"
    c.student.copy_teacher_modules = [("lm_head", False)]
    c.student.dropout = False  # Qwen2's attention_dropout is 0.0 anyway

    c.dataset.uri = "HuggingFaceH4/ultrachat_200k"
    c.dataset.subset = None
    c.dataset.split = "train_sft"
    c.dataset.column = "messages"
    c.dataset.loss_on = "completion"
    c.dataset.streaming = True  # the first sample_size rows, not the whole split
    c.dataset.sample_size = 20_000
    c.dataset.test_size = 0.01  # 200 conversations held out
    c.dataset.max_seq_len = 2048
    c.dataset.truncate = True  # each conversation one segment (cut at 2048 tokens)

    c.objective.logits = dict(weight=1.0, loss_fn="kl")
    c.objective.attn = dict(weight=0.0)
    c.objective.hs = dict(weight=0.0)

    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.objective_learning_rate = None  # no objective parameters (no projector / norm)
    c.optimizer.objective_weight_decay = None

    c.train.batch_size = 8
    c.train.grad_accum = 4
    c.train.num_epochs = 1.0
    c.train.dtype = "bfloat16"
    c.train.log_steps = 10
    c.train.save_steps = 200
    c.eval.eval_steps = 200
    c.eval.batch_size = 8
    return c
