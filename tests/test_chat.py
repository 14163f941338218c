"""Chat and prompt/completion rows, dataset.loss_on="completion" and its loss mask, the data
errors, and configs/chat.py.

References we did not write: transformers' ``apply_chat_template(...,
return_assistant_tokens_mask=True)`` on a template with ``{% generation %}`` markers, the
tokenizer itself (prompt/completion by construction), float64 NumPy losses and perplexity.

Tolerances: LOSS_TOL = 1e-5 absolute on float32 losses of order 0.1-10 against float64 (relative
on the summed held-out log-likelihood).
"""

import concurrent.futures
import json
import math
import multiprocessing

import datasets
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from distil_jax import data, models
from distil_jax import train_step as ts
from distil_jax.demo import corpus
from tests import tiny_setup as T
from tests.np_reference import np_log_softmax

LOSS_TOL = 1e-5
CHAT_CONFIG = "configs/chat.py"

# A ChatML template (Qwen's turn format) whose assistant turns are marked for transformers'
# assistant mask: the content and the turn's end, as a model learns to write them.
TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' %}"
    "{% generation %}{{- m['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}{{- m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The same rendering without the markers (as Qwen2.5's own template: no generation markers).
PLAIN_TEMPLATE = TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")

CONVERSATIONS = [
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "What does os.path.join do?"},
     {"role": "assistant", "content": "It joins path components."},
     {"role": "user", "content": "And os.getcwd?"},
     {"role": "assistant", "content": "Returns the current working directory."}],
    [{"role": "user", "content": "Sort a list in place."},
     {"role": "assistant", "content": "Call list.sort()."}],
    [{"role": "user", "content": "Name a hash function."},
     {"role": "assistant", "content": "hashlib.sha256 computes SHA-256."},
     {"role": "user", "content": "Thanks"},
     {"role": "assistant", "content": "You are welcome."}],
]


def chat_tokenizer(template=TEMPLATE):
    """A BPE trained here, with ChatML's special tokens and a chat template."""
    tok = corpus.train_tokenizer(corpus.stdlib_docstrings(max_docs=24), vocab_size=400,
                                 model_max_length=256)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


def hf_mask(tok, messages):
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    return list(enc["input_ids"]), list(enc["assistant_masks"])


def chat_rows(n=None):
    convs = CONVERSATIONS if n is None else [CONVERSATIONS[i % 3] for i in range(n)]
    return datasets.Dataset.from_list([{"messages": c} for c in convs])


# ------------------------------------------------------------------------------ token masks


@pytest.mark.parametrize("template", [TEMPLATE, PLAIN_TEMPLATE], ids=["markers", "no-markers"])
def test_chat_masks_are_transformers_assistant_masks(tok, template):
    """With generation markers the mask is transformers'; without them (Qwen2.5's template), the
    turns found by rendering prefixes give the same mask as the marked template."""
    own = chat_tokenizer(template)
    shape = data.RowShape("chat", "messages")
    docs, masks = data.encode(chat_rows(), own, shape, "completion")
    for conv, ids, mask in zip(CONVERSATIONS, docs, masks):
        want_ids, want_mask = hf_mask(tok, conv)
        assert ids.tolist() == want_ids
        assert mask.tolist() == want_mask
        assert 0 < sum(want_mask) < len(want_mask)
    all_docs, none = data.encode(chat_rows(), own, shape, "all")
    assert none is None and [d.tolist() for d in all_docs] == [d.tolist() for d in docs]


def test_prompt_completion_masks_by_construction(tok):
    rows = datasets.Dataset.from_dict({"prompt": ["def f(x):", "import os\n"],
                                       "completion": [" return x + 1", "print(os.sep)"]})
    shape = data.RowShape(*data.detect_shape("d", rows.column_names, None, None, rows[0]))
    assert shape == data.RowShape("prompt_completion", "prompt", "completion")
    docs, masks = data.encode(rows, tok, shape, "completion")
    for p, c, ids, mask in zip(rows["prompt"], rows["completion"], docs, masks):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"]
        assert ids.tolist() == p_ids + c_ids
        assert mask.tolist() == [0] * len(p_ids) + [1] * len(c_ids)


def test_chat_shaped_prompt_completion_masks_the_completion_turn(tok):
    """TRL's conversational prompt/completion: the completion (one assistant turn) is exactly
    what transformers' assistant mask marks in the whole conversation."""
    conv = CONVERSATIONS[1]
    rows = datasets.Dataset.from_list([{"prompt": conv[:1], "completion": conv[1:]}])
    shape = data.RowShape("prompt_completion", "prompt", "completion")
    docs, masks = data.encode(rows, tok, shape, "completion")
    want_ids, want_mask = hf_mask(tok, conv)
    assert docs[0].tolist() == want_ids and masks[0].tolist() == want_mask


@pytest.mark.parametrize("layout", ["pack", "pad"])
@pytest.mark.parametrize("truncate", [True, False])
def test_loss_mask_in_both_layouts(tok, layout, truncate):
    """loss_mask[t] = 1 exactly where the next token of t's document is an assistant token
    (transformers' mask shifted by one, as TRL shifts labels), in packed and padded rows."""
    docs, masks = data.encode(chat_rows(), tok, data.RowShape("chat", "messages"), "completion")
    seq = 48  # shorter than the conversations: rows continue (truncate=False) or cut
    rows = data.docs_to_rows(docs, seq, layout, eos_id=tok.eos_token_id, pad_id=0,
                             truncate=truncate, append_eos=False, masks=masks)
    # Every counted position as (its token, the token it predicts; -1 where a cut document's
    # next token is not in the row), from transformers' mask on the whole documents.
    want = []
    for conv in CONVERSATIONS:
        ids_ref, m = hf_mask(tok, conv)
        n = min(len(ids_ref), seq) if truncate else len(ids_ref)
        want += [(ids_ref[t], ids_ref[t + 1] if t + 1 < n else -1)
                 for t in range(min(n, len(ids_ref) - 1)) if m[t + 1]]
    ids, seg, lm = rows["input_ids"], rows["segment_ids"], rows["loss_mask"]
    assert not (lm.astype(bool) & (seg == 0)).any()
    got = []
    for r, t in zip(*np.nonzero(lm)):
        if t + 1 < seq and seg[r, t + 1] == seg[r, t]:
            got.append((int(ids[r, t]), int(ids[r, t + 1])))
        elif truncate:
            got.append((int(ids[r, t]), -1))
        else:  # the document goes on at the start of the next row, in both layouts
            got.append((int(ids[r, t]), int(ids[r + 1, 0])))
    assert sorted(got) == sorted(want) and len(want) > 10
    assert data.counted_tokens(rows) == len(want)


def test_distily_eval_rows_mask(tok):
    docs, masks = data.encode(chat_rows(), tok, data.RowShape("chat", "messages"), "completion")
    rows = data.distily_eval_rows(docs, 64, bos_id=7, pad_id=0, masks=masks)
    for r, m in enumerate(masks):
        # Position 0 (BOS) predicts the document's first token; position t its token t.
        n = min(len(m), 63)
        assert rows["loss_mask"][r, :n].tolist() == m[:n].tolist()


# ------------------------------------------------------------------------------ the losses


@pytest.fixture(scope="module")
def setup():
    tc, tp = T.teacher()
    s_cfg, sp, trainable = T.student(tc, tp)
    return tc, tp, s_cfg, sp, trainable


def _masked_batch():
    b = T.batch(T.ROWS_8)
    lm = np.random.RandomState(3).randint(0, 2, b["segment_ids"].shape).astype(np.int32)
    b["loss_mask"] = np.where(b["segment_ids"] > 0, lm, 0).astype(np.int32)
    return b


def test_completion_loss_matches_float64_numpy(setup):
    """The step's logits KL and hard next-token loss with a loss mask are float64 NumPy means
    over the counted positions only; the attention and hidden-state components equal the
    unmasked per-token losses averaged over the same positions."""
    tc, tp, s_cfg, sp, _ = setup
    b = _masked_batch()
    obj = T.objective(s_cfg, tc, logits_chunk_tokens=0, clm_weight=0.5,
                      hs=dict(weight=0.7, loss_fn="raw_mse", layer_mapper="last"))
    params = T.params_tree(obj, s_cfg, tc, sp)
    sc = ts.StepConfig(tc, s_cfg, obj)
    loss, parts = jax.jit(lambda p, bb: ts.distill_loss(sc, p, tp, bb, None))(
        params, {k: jnp.asarray(v) for k, v in b.items()})

    ids, seg, lm = b["input_ids"], b["segment_ids"], b["loss_mask"]
    counted = (seg > 0) & (lm > 0)
    s_out = models.forward(s_cfg, sp, ids, segment_ids=seg)
    t_out = models.forward(tc, tp, ids, segment_ids=seg)
    ls, lt = np_log_softmax(s_out.logits), np_log_softmax(t_out.logits)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)[counted].mean()
    nxt = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], 1)
    same = np.concatenate([(seg[:, 1:] == seg[:, :-1]), np.zeros_like(seg[:, :1], bool)], 1)
    ok = counted & same
    clm = -np.take_along_axis(ls, nxt[..., None], -1)[..., 0][ok].mean()
    assert abs(float(parts["loss/logits"]) - kl) < LOSS_TOL
    assert abs(float(parts["loss/clm"]) - clm) < LOSS_TOL

    # The feature components, masked by construction: the per-token losses (computed with no
    # mask) averaged in float64 over the counted positions.
    feats = obj.features(s_cfg, tc)
    s_full = models.forward(s_cfg, sp, ids, segment_ids=seg, **feats["student"])
    t_full = models.forward(tc, tp, ids, segment_ids=seg, **feats["teacher"])
    per = obj.per_token(params["objective"], s_full, t_full, jnp.asarray(seg), jnp.asarray(ids))
    for name in ("hs", "attn"):
        want = np.asarray(per[f"loss/{name}"], np.float64)[counted].mean()
        assert want > 1e-4
        assert abs(float(parts[f"loss/{name}"]) - want) < LOSS_TOL
    total = kl + 0.5 * clm + 0.7 * float(parts["loss/hs"]) + 5.0 * float(parts["loss/attn"])
    assert abs(float(loss) - total) < 1e-4

    # The padding-aware gather (77 real tokens of 128 -> capacity 80) and chunked logits keep
    # the mask: the same losses.
    for common in (dict(logits_capacity=80), dict(logits_chunk=24),
                   dict(logits_capacity=80, logits_chunk=8)):
        sc2 = ts.StepConfig(tc, s_cfg, obj, **common)
        _, parts2 = jax.jit(lambda p, bb: ts.distill_loss(sc2, p, tp, bb, None))(
            params, {k: jnp.asarray(v) for k, v in b.items()})
        for k in ("loss/logits", "loss/clm"):
            assert abs(float(parts2[k]) - float(parts[k])) < 1e-6, (common, k)


def test_completion_step_accumulates_and_evaluates_over_counted_tokens(setup):
    """A step with loss_mask: grad_accum=2 gives the one-batch loss (micro-batches weighted by
    their counted tokens), counted_tokens is logged, and the eval step's perplexity counts only
    the masked-in next tokens (float64 NumPy)."""
    tc, tp, s_cfg, sp, trainable = setup
    b = _masked_batch()
    obj = T.objective(s_cfg, tc, logits_chunk_tokens=0)
    params = T.params_tree(obj, s_cfg, tc, sp)
    losses = {}
    for accum in (1, 2):
        sc = ts.StepConfig(tc, s_cfg, obj, grad_accum=accum)
        tx, sched = ts.make_optimizer(dict(learning_rate=1e-3, optimizer="adamw"), 10,
                                      T.trainable_mask(trainable, params["objective"]))
        state = ts.create_train_state(jax.tree_util.tree_map(jnp.array, params), tx,
                                      jax.random.PRNGKey(0))
        _, m = ts.make_train_step(sc, tx, sched)(state, tp, {k: jnp.asarray(v) for k, v in b.items()})
        losses[accum] = float(m["loss"])
        counted = int(((b["segment_ids"] > 0) & (b["loss_mask"] > 0)).sum())
        assert float(m["counted_tokens"]) == counted
        assert float(m["tokens"]) == int((b["segment_ids"] > 0).sum())
    assert abs(losses[1] - losses[2]) < LOSS_TOL

    out = ts.make_eval_step(s_cfg)(sp, {k: jnp.asarray(v) for k, v in b.items()})
    ids, seg, lm = b["input_ids"], b["segment_ids"], b["loss_mask"]
    logp = np_log_softmax(models.forward(s_cfg, sp, ids, segment_ids=seg).logits)
    nxt = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], 1)
    same = np.concatenate([(seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0),
                           np.zeros_like(seg[:, :1], bool)], 1)
    ok = same & (lm > 0)
    nll = -np.take_along_axis(logp, nxt[..., None], -1)[..., 0][ok]
    assert int(out["tokens"]) == ok.sum() and 0 < ok.sum() < same.sum()
    assert abs(float(out["logprob_sum"]) + nll.sum()) < LOSS_TOL * nll.sum()  # relative


def test_teacher_cache_records_every_real_token_and_the_step_masks_it(setup):
    """The recorder stores the teacher's targets at every real token (loss_on does not change
    them); training applies the batch's loss_mask to the cached targets as to the online
    teacher: k = V gives the online loss and gradients (1e-6). A cache pins its rows with
    their loss mask, so a cache made for other counted tokens is never used."""
    from distil_jax.objectives.objective import CACHE_BATCH_KEYS, Objective
    from distil_jax.teacher_cache import pins
    from distil_jax.teacher_cache.topk import teacher_top_k

    tc, tp, s_cfg, sp, _ = setup
    host = _masked_batch()
    obj = Objective.from_config(dict(logits=dict(weight=1.0, loss_fn="kl"), clm_weight=0.3)).bind(s_cfg, tc)
    params = {"student": sp, "objective": {}}
    targets = jax.jit(lambda p, i, s: teacher_top_k(tc, p, i, s, k=T.VOCAB))(
        tp, host["input_ids"], host["segment_ids"])
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    cbatch = dict(batch, **dict(zip(CACHE_BATCH_KEYS, (jnp.asarray(t) for t in targets))))
    results = []
    for sc, tparams, b in ((ts.StepConfig(tc, s_cfg, obj), tp, batch),
                           (ts.StepConfig(tc, s_cfg, obj, teacher_cache_k=T.VOCAB), None, cbatch)):
        fn = jax.value_and_grad(lambda p: ts.distill_loss(sc, p, tparams, b, None)[0])
        loss, grad = fn(params)
        results.append((float(loss), T.to_numpy(grad)))
    (l_on, g_on), (l_ca, g_ca) = results
    assert abs(l_on - l_ca) <= 1e-6 * max(1.0, abs(l_on))
    assert T.max_abs_diff(g_on, g_ca) <= 1e-6
    unmasked = {k: v for k, v in host.items() if k != "loss_mask"}
    assert pins.rows_fingerprint(host) != pins.rows_fingerprint(unmasked)


# ------------------------------------------------------------------------------ errors


def test_one_line_errors(tmp_path, tok):
    shape = data.RowShape("chat", "messages")
    no_template = chat_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="has no chat template.*tokenizer_name_or_path"):
        data.encode(chat_rows(), no_template, shape, "completion")
    bad = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"},
                                                    {"content": "no role"}]}])
    with pytest.raises(ValueError, match="row 0: turn 1 has no 'role'.*role and a content"):
        data.encode(bad, tok, shape, "all")
    bad = datasets.Dataset.from_list([{"messages": [{"role": "user"}]}])
    with pytest.raises(ValueError, match="turn 0 has no 'content'"):
        data.encode(bad, tok, shape, "all")
    text = datasets.Dataset.from_dict({"text": ["plain text"]})
    with pytest.raises(ValueError, match="loss_on='completion' needs chat rows.*loss_on='all'"):
        data.encode(text, tok, data.RowShape("text", "text"), "completion")
    with pytest.raises(ValueError, match="has 402 tokens but the teacher a vocabulary of 101.*"
                                         "tokenizer_name_or_path"):
        data.check_vocab(tok, 101, "the teacher")
    data.check_vocab(tok, len(tok) + 5)  # a larger (padded) teacher vocabulary is fine


def test_student_vocabulary_must_be_the_teachers(tmp_path):
    import transformers

    from distil_jax import student

    path = tmp_path / "student"
    transformers.GPT2Config(vocab_size=77, n_layer=1, n_embd=16, n_head=2).save_pretrained(path)
    tc, tp = T.teacher()
    # Checked from the config, before the weights are read.
    with pytest.raises(ValueError, match="vocab_size 77 differs from the teacher's 101.*"
                                         "student.model_name_or_path=''"):
        student.build_student(tc, tp, {"model_name_or_path": str(path)}, jax.random.PRNGKey(0))


# ------------------------------------------------------------------------------ sources


def test_chat_jsonl_end_to_end_rows(tmp_path, tok):
    """A local messages .jsonl: detected as chat, split, rows with loss_mask; the counted
    tokens are the assistant tokens' count less the ones no position predicts."""
    path = tmp_path / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(20):
            f.write(json.dumps({"messages": CONVERSATIONS[i % 3], "id": i}) + "\n")
    spec = ml_collections.ConfigDict(dict(uri=str(path), loss_on="completion", test_size=0.1))
    train, test, stats = data.build_datasets(spec, tok, 64, "pack", cache_dir=tmp_path / "tok")
    assert stats["row_shape"] == "chat" and stats["train"]["documents"] == 18
    assert stats["test"]["documents"] == 2
    assert "loss_mask" in train and "loss_mask" in test.rows and "loss_mask" in test.distily_rows
    # The cache (v2, with the masks) gives the same rows the second time.
    again, _, _ = data.build_datasets(spec, tok, 64, "pack", cache_dir=tmp_path / "tok")
    for k in train:
        np.testing.assert_array_equal(train[k], again[k])


def test_streaming_takes_sample_size_rows_of_the_stream(tmp_path, monkeypatch):
    """dataset.streaming: a hub dataset is read as an IterableDataset and only its first
    sample_size rows are kept (the hub is offline here: the stream is a local one)."""
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(50):
            f.write(json.dumps({"messages": CONVERSATIONS[i % 3], "n": i}) + "\n")
    real_load = datasets.load_dataset
    calls = []

    def fake_hub(uri, subset=None, split=None, streaming=False, **kw):
        calls.append((uri, subset, split, streaming))
        assert streaming, "a hub dataset with streaming=True must be streamed"
        return real_load("json", data_files={split: str(path)}, split=split, streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    spec = ml_collections.ConfigDict(dict(uri="someone/chats", split="train_sft", streaming=True,
                                          sample_size=7, shuffle=False))
    ds, shape = data.load_rows(spec)
    assert calls == [("someone/chats", None, "train_sft", True)]
    assert ds["n"] == list(range(7)) and shape == data.RowShape("chat", "messages")
    with pytest.raises(ValueError, match="streaming=True reads sample_size rows.*sample_size"):
        data.load_rows(ml_collections.ConfigDict(dict(uri="someone/chats", streaming=True)))


def test_token_cache_versions(tmp_path, tok):
    """Plain text with loss_on="all" keeps the v1 file (same key, same layout as before); chat
    rows and masks have their own v2 file; a file that lacks the masks is rebuilt, not read."""
    import glob

    texts = ["first document", "second one"]
    rows = datasets.Dataset.from_dict({"text": texts})
    v1 = data.tokenize_cached(texts, tok, tmp_path)
    docs, masks = data.encode_cached(rows, tok, data.RowShape("text", "text"), "all", tmp_path)
    assert masks is None and [d.tolist() for d in docs] == [d.tolist() for d in v1]
    assert len(glob.glob(str(tmp_path / "tokens-*.npz"))) == 1  # the same file
    shape = data.RowShape("chat", "messages")
    docs, masks = data.encode_cached(chat_rows(), tok, shape, "completion", tmp_path)
    files = sorted(glob.glob(str(tmp_path / "tokens-*.npz")))
    assert len(files) == 2
    chat_file = [f for f in files if "token_mask" in np.load(f).files]
    assert len(chat_file) == 1
    with np.load(chat_file[0]) as z:  # an old-format file under the new key: no masks
        tokens, offsets = z["tokens"], z["offsets"]
    np.savez(chat_file[0], tokens=tokens, offsets=offsets)
    again, again_masks = data.encode_cached(chat_rows(), tok, shape, "completion", tmp_path)
    assert [m.tolist() for m in again_masks] == [m.tolist() for m in masks]
    assert "token_mask" in np.load(chat_file[0]).files


def _encode_with(tok, num_proc):
    shape = data.RowShape("chat", "messages")
    return [[x.tolist() for x in a] for a in data.encode(chat_rows(8), tok, shape, "completion",
                                                         num_proc=num_proc)]


def test_num_proc_gives_the_same_ids_and_masks(tok):
    """dataset.num_proc: datasets.map over 2 processes tokenizes exactly as one. In a fresh
    (spawned) interpreter: datasets forks its workers, and forking this test process, whose XLA
    threads run, once left a worker blocked on a lock (a hung suite)."""
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        two = pool.submit(_encode_with, tok, 2).result(timeout=600)
    assert two == _encode_with(tok, None)


def test_default_config_trains_on_every_row(tmp_path):
    """--config.dataset.uri=FILE alone: every row is used (1 % held out, at least one)."""
    from distil_jax import cli, config as config_lib

    path = tmp_path / "notes.jsonl"
    texts = corpus.stdlib_docstrings(max_docs=150)
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("from distil_jax.config import default_config\n\n"
                        "def get_config():\n    return default_config()\n")
    cfg = config_lib.validate(cli.load_config(str(cfg_file), [f"--config.dataset.uri={path}"]))
    assert cfg.dataset.sample_size is None and cfg.dataset.test_size == 0.01
    tok = corpus.train_tokenizer(texts[:20], vocab_size=300)
    train, test, stats = data.build_datasets(cfg.dataset, tok, 64, cfg.dataset.layout)
    assert stats["row_shape"] == "text"
    assert stats["train"]["documents"] + stats["test"]["documents"] == len(texts)
    assert stats["test"]["documents"] == math.ceil(0.01 * len(texts))
    # The cap on a fraction's held-out rows.
    assert len(data.split_indices(300_000, 0.01, 0, 2000)[1]) == 2000
    assert len(data.split_indices(50, 0.01, 0, 2000)[1]) == 1
    # --config.FIELD=None for the None-able new fields.
    cfg = cli.load_config(str(cfg_file), ["--config.dataset.max_test_rows=None",
                                          "--config.dataset.column=messages",
                                          "--config.dataset.num_proc=2",
                                          "--config.dataset.column=None"])
    assert cfg.dataset.max_test_rows is None and cfg.dataset.column is None
    assert cfg.dataset.num_proc == 2


# ------------------------------------------------------------------------------ configs/chat.py


def test_chat_config_validates():
    from distil_jax import config as config_lib

    c = config_lib.load(CHAT_CONFIG)
    assert c.teacher.model_name_or_path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert c.dataset.column == "messages" and c.dataset.loss_on == "completion"
    assert c.dataset.streaming and c.dataset.sample_size


def tiny_qwen_teacher(path, tok):
    """A random 2-layer Qwen2 (transformers) with the chat tokenizer, saved as a hub folder."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok) + 14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _local_chat_config(tmp_path, tok):
    """configs/chat.py on a local messages .jsonl and a tiny local Qwen2 teacher."""
    from distil_jax import config as config_lib

    chats = tmp_path / "chats.jsonl"
    with open(chats, "w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": CONVERSATIONS[i % 3]}) + "\n")
    c = config_lib.load(CHAT_CONFIG)
    c.teacher.model_name_or_path = str(tiny_qwen_teacher(tmp_path / "teacher", tok))
    c.teacher.dtype = "float32"
    c.dataset.update(uri=str(chats), split="train", streaming=False, sample_size=None,
                     max_seq_len=64)
    c.dataset.test_size = 0.1
    c.student.overrides = {"num_hidden_layers": 1}
    c.train.update(batch_size=4, grad_accum=1, max_steps=2, dtype="float32", remat=False,
                   log_steps=1, save_steps=0)
    c.eval.batch_size = 4
    return c


@pytest.mark.slow
def test_chat_config_trains_on_local_conversations(tmp_path, tok):
    """configs/chat.py pointed at a local messages .jsonl and a tiny local Qwen2 teacher with a
    chat template: 2 steps end to end, the losses on the assistant turns (counted_tokens
    logged, fewer than the real tokens); then a teacher cache recorded for it (every real token
    recorded, the teacher's held-out perplexity over the counted tokens) trains 2 steps too."""
    from distil_jax.record_teacher import record
    from distil_jax.training.loop import train

    c = _local_chat_config(tmp_path, tok)
    result = train(c, tmp_path / "run")
    assert result["step"] == 2 and math.isfinite(result["loss"])
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "counted_tokens" in r]
    assert len(steps) == 2 and all(0 < r["counted_tokens"] < r.get("tokens", 1e9) for r in steps)
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    train_stats = summary["dataset"]["train"]
    assert (summary["dataset"]["row_shape"], summary["dataset"]["loss_on"]) == ("chat", "completion")
    assert 0 < train_stats["counted_tokens"] < train_stats["real_tokens"]

    c.teacher.cache = str(tmp_path / "cache")
    c.teacher.cache_k = 16
    manifest = record(c, tmp_path / "rec")
    assert manifest["real_tokens"] == train_stats["real_tokens"]  # every real token recorded
    held_out = result["eval"]["heldout"]["teacher"]
    assert manifest["teacher_eval"]["heldout"]["tokens"] == held_out["tokens"]
    assert manifest["teacher_eval"]["heldout"]["ppl"] == pytest.approx(held_out["ppl"], rel=1e-5)
    cached = train(c, tmp_path / "run_cached")
    assert cached["step"] == 2 and math.isfinite(cached["loss"])
    _export_and_evaluate_from_the_command_line(tmp_path, tmp_path / "run")


def _export_and_evaluate_from_the_command_line(tmp_path, workdir):
    """The chat run's export keeps the teacher tokenizer's chat template, and the evaluation
    command runs an lm-eval task on the teacher and that export, side by side."""
    import transformers

    from distil_jax import evaluate, export
    from tests.test_evaluate import LL, QUESTIONS, TASK

    out = tmp_path / "student"
    assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "qa.jsonl").write_text("".join(json.dumps(dict(question=q, choices=c, answer=a)) + "\n"
                                            for q, c, a in QUESTIONS))
    (tasks / "qa.yaml").write_text(TASK.format(name="chat_qa", data=tasks / "qa.jsonl") + LL)
    argv = ["--workdir", str(workdir), "--student", str(out), "--tasks", "chat_qa",
            "--include-path", str(tasks), "--batch-size", "4", "--bootstrap-iters", "0"]
    assert evaluate.main(argv) == 0
    rows = json.loads((workdir / evaluate.RESULTS_FILE).read_text())["rows"]
    assert {r["metric"] for r in rows} >= {"perplexity"}
    assert all(math.isfinite(r["teacher"]) and math.isfinite(r["student"]) for r in rows)


def test_a_run_from_before_loss_on_resumes_unchanged():
    """A config.json written before dataset.loss_on / streaming / completion_column existed
    ran as their defaults do: resuming with them is no change; another value is refused."""
    from distil_jax import config as config_lib
    from distil_jax import workdir

    new = json.loads(config_lib.load("configs/base.py").to_json_best_effort())
    old = json.loads(json.dumps(new))
    for field in ("loss_on", "streaming", "completion_column"):
        del old["dataset"][field]
    old["dataset"]["num_proc"] = 4
    old["dataset"]["max_test_rows"] = None  # before the cap: the resume must say so
    refused, allowed = workdir.config_changes(old, new)
    assert refused == {"dataset.max_test_rows": [None, 2000]}
    assert allowed == {"dataset.num_proc": [4, None]}
    new["dataset"]["loss_on"] = "completion"
    assert "dataset.loss_on" in workdir.config_changes(old, new)[0]
