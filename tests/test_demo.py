"""The demo teacher's cache outside the workdir (distil_jax.demo.teacher): a second build with the
same recipe reuses it, another recipe trains its own, and an entry that was never completely
written is never used. Tiny settings (a 1-layer, 16-wide teacher, 3 steps): seconds."""

import logging
import os
import shutil

import ml_collections
import pytest
import transformers

from distil_jax.demo import corpus, teacher


def _recipe(**changes):
    cfg = ml_collections.ConfigDict(dict(vocab_size=300, n_layer=1, n_embd=16, n_head=2,
                                         n_positions=16, steps=3, batch_size=2, learning_rate=3e-3))
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    corpus.write_jsonl(corpus.stdlib_docstrings(max_docs=8), path)
    return ml_collections.ConfigDict(dict(uri=str(path), subset=None, sample_size=None,
                                          test_size=0.25))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """DISTIL_JAX_CACHE in tmp_path, and a count of the teacher trainings (teacher._fit calls)."""
    monkeypatch.setenv(teacher.CACHE_ENV, str(tmp_path / "cache"))
    fits = []
    real_fit = teacher._fit

    def counting_fit(*args, **kwargs):
        fits.append(args[2].steps)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(teacher, "_fit", counting_fit)
    return tmp_path / "cache", fits


def _entries(root):
    """The cache's entries (hidden temp folders included)."""
    folder = root / "demo_teacher"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cache_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(teacher.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert teacher.cache_root() == tmp_path / "xdg" / "distil_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert teacher.cache_root() == tmp_path / "home" / ".cache" / "distil_jax"
    monkeypatch.setenv(teacher.CACHE_ENV, str(tmp_path / "mine"))
    assert teacher.cache_root() == tmp_path / "mine"


def test_second_build_reuses_the_cached_teacher(tmp_path, dataset, cache, caplog):
    root, fits = cache
    first = teacher.ensure_teacher(tmp_path / "w1", _recipe(), dataset)
    assert fits == [3] and len(_entries(root)) == 1
    caplog.set_level(logging.INFO, logger=teacher.__name__)
    second = teacher.ensure_teacher(tmp_path / "w2", _recipe(), dataset)  # a fresh workdir
    assert fits == [3], "the same recipe trained again"
    assert "reusing the cached demo teacher" in caplog.text
    assert second == tmp_path / "w2" / "teacher"
    for name in ("model.safetensors", "config.json", "tokenizer.json", teacher.RECIPE_FILE):
        assert (second / name).read_bytes() == (first / name).read_bytes(), name
    # An ordinary HF folder, independent of the cache: transformers loads it after the cache is gone.
    shutil.rmtree(root)
    model = transformers.AutoModelForCausalLM.from_pretrained(second)
    assert model.config.n_layer == 1 and model.config.n_embd == 16


def test_a_changed_recipe_trains_its_own(tmp_path, dataset, cache):
    root, fits = cache
    teacher.ensure_teacher(tmp_path / "w", _recipe(), dataset)
    teacher.ensure_teacher(tmp_path / "w", _recipe(steps=4), dataset)  # same workdir, new recipe
    assert fits == [3, 4] and len(_entries(root)) == 2
    saved = teacher._saved_recipe(tmp_path / "w" / "teacher")
    assert saved["demo_teacher"]["steps"] == 4
    # Other train texts (a third of the rows held out instead of a quarter) are another recipe too,
    # in a fresh workdir; a workdir's own teacher of these settings is kept (as before the cache).
    other = ml_collections.ConfigDict(dict(dataset.to_dict(), test_size=0.375))
    teacher.ensure_teacher(tmp_path / "w", _recipe(steps=4), other)
    assert fits == [3, 4]
    teacher.ensure_teacher(tmp_path / "w3", _recipe(), other)
    assert fits == [3, 4, 3] and len(_entries(root)) == 3
    # Both earlier entries are still there: going back to the first recipe trains nothing.
    teacher.ensure_teacher(tmp_path / "w4", _recipe(steps=4), dataset)
    assert fits == [3, 4, 3]


def test_a_half_written_entry_is_never_used(tmp_path, dataset, cache, monkeypatch):
    root, fits = cache
    import safetensors.flax

    real_save = safetensors.flax.save_file

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 64)  # part of the weights, then the disk is full
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(safetensors.flax, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        teacher.ensure_teacher(tmp_path / "w1", _recipe(), dataset)
    assert _entries(root) == [] and not (tmp_path / "w1" / "teacher").exists()

    # A process killed while writing (SIGKILL skips every cleanup) leaves its temp folder behind,
    # complete-looking: it is not the entry, and the next write removes it.
    monkeypatch.setattr(safetensors.flax, "save_file", real_save)
    good = teacher.ensure_teacher(tmp_path / "w2", _recipe(), dataset)
    key = teacher.cached_teacher_path(teacher._saved_recipe(good)).name
    shutil.rmtree(root / "demo_teacher" / key)
    dead = root / "demo_teacher" / f".{key}.tmp-{os.uname().nodename}-999999999-0000"
    shutil.copytree(good, dead)
    teacher.ensure_teacher(tmp_path / "w3", _recipe(), dataset)
    assert fits == [3, 3, 3] and _entries(root) == [key]

    # An entry folder that says nothing of its recipe (copied in by hand, an older layout) is not
    # trusted either: it is trained again and replaced.
    (root / "demo_teacher" / key / teacher.RECIPE_FILE).unlink()
    teacher.ensure_teacher(tmp_path / "w4", _recipe(), dataset)
    assert fits == [3, 3, 3, 3]
    assert teacher._saved_recipe(root / "demo_teacher" / key) is not None
