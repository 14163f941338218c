"""generate() against transformers' generate on tiny random models (GPT-2, Llama with grouped-
query attention, Qwen3) with left-padded prompts of mixed lengths; EOS; sampling; the command."""


import jax
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from distil_jax import hf, models
from distil_jax.generate import generate, main
from tests import hf_utils, llama_utils, tiny_setup

NEW = 12  # new tokens per row
# Left padding: rows of 9, 4, 7 and 1 real tokens in a prompt of 9.
LENGTHS = (9, 4, 7, 1)
PAD = 3  # the id on the left padding (any id: it is masked)


def _gpt2():
    # initializer_range 0.3 (HF's is 0.02): a random model whose greedy continuation varies
    # instead of repeating one token, so a wrong position or cache slot changes the tokens.
    return hf_utils.tiny_hf_model(0, initializer_range=0.3)


def _llama():
    return llama_utils.tiny_hf_model("llama", 0, num_key_value_heads=2)  # GQA: 4 query, 2 kv heads


def _qwen3():
    return llama_utils.tiny_hf_model("qwen3", 0, num_key_value_heads=1)


@pytest.fixture(scope="module", params=[_gpt2, _llama, _qwen3], ids=["gpt2", "llama-gqa", "qwen3"])
def model(request, tmp_path_factory):
    """(HF model, our config, our params) of one tiny random model, loaded from its saved folder."""
    path = tmp_path_factory.mktemp(request.param.__name__)
    hf_model = request.param()
    hf_model.save_pretrained(path)
    config, params = hf.load_pretrained(path)
    return hf_model, config, params


def _prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    P = max(LENGTHS)
    mask = (np.arange(P)[None] >= P - np.array(LENGTHS)[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(0, vocab, (len(LENGTHS), P)), PAD).astype(np.int32)
    return ids, mask


def _hf_generate(hf_model, ids, mask, **kwargs):
    with torch.no_grad():
        return hf_model.generate(torch.as_tensor(ids, dtype=torch.long),
                                 attention_mask=torch.as_tensor(mask), do_sample=False,
                                 max_new_tokens=NEW, **kwargs).numpy()


def test_greedy_equals_transformers(model):
    hf_model, config, params = model
    ids, mask = _prompts(config.vocab_size)
    # No EOS on either side: every row runs all NEW tokens (a token equal to the config's EOS
    # id does not stop it).
    hf_model.generation_config.eos_token_id = None
    theirs = _hf_generate(hf_model, ids, mask, pad_token_id=PAD)
    ours = np.asarray(generate(config, params, ids, mask, max_new_tokens=NEW))
    assert ours.shape == (len(LENGTHS), max(LENGTHS) + NEW)
    np.testing.assert_array_equal(ours, theirs)
    assert len(set(ours[:, -NEW:].ravel().tolist())) > 4  # the continuations vary


def test_eos_ends_a_row_and_fills_like_transformers(model):
    hf_model, config, params = model
    ids, mask = _prompts(config.vocab_size)
    free = np.asarray(generate(config, params, ids, mask, max_new_tokens=NEW))[:, -NEW:]
    # An EOS that greedy decoding writes mid-way in some row but not in every row: that row ends
    # there, the others run on.
    eos = next(int(t) for t in free[:, 1:NEW - 2].ravel()
               if 0 < sum(t in row for row in free) < len(free))
    fill = (eos + 1) % config.vocab_size
    theirs = _hf_generate(hf_model, ids, mask, eos_token_id=eos, pad_token_id=fill)
    ours = np.asarray(generate(config, params, ids, mask, max_new_tokens=NEW, eos_token_id=eos,
                               pad_token_id=fill))
    # transformers stops when every row has ended; we always return NEW tokens (the rest fill).
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == fill).all()
    ended = [row for row in ours[:, -NEW:] if eos in row]
    assert ended and all((row[list(row).index(eos) + 1:] == fill).all() for row in ended)


def test_the_same_rng_gives_the_same_samples_and_another_differs(model):
    _, config, params = model
    ids, mask = _prompts(config.vocab_size)
    settings = dict(max_new_tokens=NEW, temperature=1.5, top_k=20, top_p=0.95)
    a = generate(config, params, ids, mask, rng=jax.random.key(1), **settings)
    b = generate(config, params, ids, mask, rng=jax.random.key(1), **settings)
    c = generate(config, params, ids, mask, rng=jax.random.key(2), **settings)
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()


def _hf_filtered_probs(logits, temperature, top_k, top_p):
    scores = torch.tensor(logits[None], dtype=torch.float64)
    for warper in ([TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k),
                    TopPLogitsWarper(top_p)]):
        scores = warper(None, scores)
    return torch.softmax(scores, -1)[0].numpy()


def test_the_first_sampled_token_follows_the_filtered_softmax(tmp_path):
    """A chi-square goodness-of-fit (p > 1e-4) of 20,000 first tokens of one prompt against
    transformers' warpers on the torch model's last logits, at a vocabulary of 16."""
    hf_model = hf_utils.tiny_hf_model(0, vocab_size=16, initializer_range=0.3)
    hf_model.save_pretrained(tmp_path)
    config, params = hf.load_pretrained(tmp_path)
    prompt = np.array([[5, 1, 9, 2]], np.int32)
    settings = dict(temperature=0.9, top_k=10, top_p=0.95)
    draws = 20_000
    out = generate(config, params, np.repeat(prompt, draws, 0), max_new_tokens=1,
                   rng=jax.random.key(0), **settings)
    counts = np.bincount(np.asarray(out)[:, -1], minlength=16)
    with torch.no_grad():
        logits = hf_model(torch.as_tensor(prompt, dtype=torch.long)).logits[0, -1].double().numpy()
    probs = _hf_filtered_probs(logits, **settings)
    assert counts[probs == 0].sum() == 0
    kept = probs > 0
    assert kept.sum() >= 3
    p_value = scipy.stats.chisquare(counts[kept], probs[kept] / probs[kept].sum() * draws).pvalue
    assert p_value > 1e-4, (counts, probs * draws)


def test_too_long_is_a_one_line_error(model):
    _, config, params = model
    ids, mask = _prompts(config.vocab_size)
    too_many = config.max_positions - ids.shape[1] + 1
    with pytest.raises(ValueError, match=r"exceeds the model's \d+ positions; shorten the prompt "
                                         r"or ask for at most \d+ new tokens"):
        generate(config, params, ids, mask, max_new_tokens=too_many)
    with pytest.raises(ValueError, match="needs an rng key"):
        generate(config, params, ids, mask, max_new_tokens=2, temperature=1.0)



def test_a_cached_forward_without_positions_is_refused(model):
    """With a cache the tokens sit after the cache's, so 0..S-1 would be wrong: refused."""
    _, config, params = model
    ids, mask = _prompts(config.vocab_size)
    cache = models.init_cache(config, ids.shape[0], ids.shape[1] + 2)
    with pytest.raises(ValueError, match="a forward with a key/value cache needs positions: pass "
                                         r"positions \[B, S\]"):
        models.forward(config, params, ids, mask, cache=cache)


# ----------------------------------------------------------------------------- the command

PROMPTS = ["Return the number of", "def f(x):\n    return"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A seconds-long distillation run (demo teacher, 10 steps) and its export."""
    return tiny_setup.run_and_export(tmp_path_factory, tiny_setup.tiny_run_config(max_steps=10))


def _command(capsys, *argv):
    code = main([*argv, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_on_an_export_prints_transformers_completions(run, capsys):
    import transformers

    _, folder = run
    code, out, err = _command(capsys, "--model", str(folder))
    assert code == 0, err
    tok = transformers.AutoTokenizer.from_pretrained(folder, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    expected = "".join(f"--- {i + 1}/2\n{p}{t}\n" for i, (p, t) in enumerate(zip(PROMPTS, texts)))
    assert out == expected


def test_command_on_a_workdir_equals_its_export(run, capsys):
    workdir, folder = run
    code, from_workdir, err = _command(capsys, "--workdir", str(workdir))
    assert code == 0, err
    assert _command(capsys, "--model", str(folder))[1] == from_workdir
    code, sampled, err = _command(capsys, "--workdir", str(workdir), "--temperature", "1.0",
                                  "--top-k", "50", "--top-p", "0.9", "--seed", "3")
    assert code == 0, err
    assert sampled.count("--- ") == 2


def test_command_errors_are_one_line(tmp_path, capsys):
    assert main(["--help"]) == 0
    code, _, err = _command(capsys, "--workdir", str(tmp_path / "nope"))
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    code, _, err = _command(capsys, "--workdir", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "student/config.json" in err
