"""Hugging Face <-> distil_jax: configs and weights of every model family, in both directions.

`load_pretrained` reads an HF folder or hub id (safetensors, sharded safetensors, or
`pytorch_model.bin` through torch) into `(config, params)`, checking every key and shape;
`save_pretrained` writes a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads as
the family's class with no missing or unexpected keys. Parameter paths are HF's names (each family
owns its mapping, see `distil_jax.models`), so conversion is a rename, plus a transpose where HF
stores a torch Linear ([out, in]), and a stack: the blocks' parameters are stacked on a leading
layer axis, so `model.layers.3.self_attn.q_proj.weight` <-> slice 3 of
`model/layers/self_attn/q_proj/kernel` (`models.stack_layers` / `unstack_layers`). The embedding
and head are stored padded to `config.padded_vocab_size`: import appends zero rows, export cuts
them, so an HF tensor always has exactly vocab_size rows. `is_hub_id` and `teacher_license` are the
hub facts the model card states (`distil_jax.modelcard`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from distil_jax import fsio, models

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_LICENSE_KEYS = ("license", "license_name", "license_link")  # license "other" names the license
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """An HF checkpoint that does not fit the model (keys, shapes, type, options)."""


# ----------------------------------------------------------------------------- config


def config_from_hf(hf_config: Any):
    """A transformers config, or a config.json dict, -> the family's config (strict)."""
    try:
        return models.config_from_hf(hf_config)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def config_to_hf(config):
    """A distil_jax config -> the transformers config of its family (architectures set)."""
    return models.config_to_hf(config)


# ----------------------------------------------------------------------------- weights


def hf_state_dict_to_params(config, state: Mapping[str, Any], dtype=jnp.float32) -> dict:
    """HF state dict (name -> array, any framework convertible by numpy) -> params, checked.

    Raises CheckpointError naming every missing or unexpected key and every wrong shape.
    """
    fam = models.family(config)
    # HF names one tensor per layer: check them in the per-layer view, then stack the layers.
    expected = traverse_util.flatten_dict(models.hf_param_shapes(config))
    head = fam.lm_head_path(config)
    flat, unexpected, wrong = {}, [], []
    for name, value in state.items():
        path = fam.hf_to_path(name)
        if path is None:
            continue  # a buffer, not a parameter
        if config.tie_word_embeddings and path == ("lm_head", "kernel") and path != head:
            continue  # the tied head is the embedding (some checkpoints store it anyway)
        if path not in expected:
            unexpected.append(name)
            continue
        arr = jnp.asarray(value)
        if fam.hf_transposed(path):
            arr = arr.T  # torch Linear [out, in] -> Dense kernel [in, out]
        want = models.hf_shape(config, path, expected[path].shape)  # vocabulary unpadded
        if tuple(arr.shape) != want:
            wrong.append(f"{name}: checkpoint {tuple(value.shape)}, config expects "
                         f"{want[::-1] if fam.hf_transposed(path) else want}")
            continue
        # The embedding and head are stored with zero rows up to the padded vocabulary.
        flat[path] = models.pad_vocab_leaf(config, path, arr.astype(dtype))
    wrong_names = {w.split(":")[0] for w in wrong}
    missing = [fam.path_to_hf(p) for p in expected
               if p not in flat and fam.path_to_hf(p) not in wrong_names]
    problems = []
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong))
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if problems:
        raise CheckpointError(f"checkpoint does not match its {config.model_type} config: "
                              + " | ".join(problems))
    return models.stack_layers(config, traverse_util.unflatten_dict(flat))


def params_to_hf_state_dict(config, params: Mapping, dtype=None) -> dict[str, jax.Array]:
    """params -> HF state dict names (a tied head omitted, as HF saves it); the stacked blocks
    become one tensor per layer (slice N -> `...h.N...`)."""
    fam = models.family(config)
    out = {}
    for path, value in traverse_util.flatten_dict(models.unstack_layers(config, params)).items():
        value = models.unpad_vocab_leaf(config, path, value)  # exactly vocab_size rows
        if fam.hf_transposed(path):
            value = value.T
        if dtype is not None:
            value = value.astype(dtype)
        out[fam.path_to_hf(path)] = value
    return out


# ----------------------------------------------------------------------------- loading


def resolve_folder(name_or_path: str | os.PathLike, allow_patterns: Optional[list] = None) -> Path:
    """A local folder, or a hub id downloaded with huggingface_hub (respects HF_HUB_OFFLINE)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    s = str(name_or_path)
    # A hub id is "name" or "org/name"; anything else (absolute, relative, deeper) is a path.
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise FileNotFoundError(
            f"model folder not found: {s!r}; pass an existing folder holding config.json, or a hub "
            "id like 'gpt2'"
        )
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(s, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable"
        raise FileNotFoundError(
            f"cannot get {s!r} from the Hugging Face hub ({why}) and it is not in the local cache; "
            "download it on a connected machine or pass a local folder"
        ) from e
    except Exception as e:  # RepositoryNotFoundError, HTTP errors: say which id failed
        raise FileNotFoundError(
            f"cannot get {s!r} from the Hugging Face hub: {type(e).__name__}: {e}".splitlines()[0]
        ) from e


def _unreadable_weights(path: Path, e: BaseException) -> CheckpointError:
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, FileNotFoundError):
        why = "missing (listed in the index)"
    return CheckpointError(f"cannot read the weights file {path}: {why}; it is corrupt or "
                           "truncated: download or export it again")


def _read_state_dict(folder: Path) -> dict[str, Any]:
    st = folder / "model.safetensors"
    st_index = folder / "model.safetensors.index.json"
    pt = folder / "pytorch_model.bin"
    pt_index = folder / "pytorch_model.bin.index.json"
    if st.exists() or st_index.exists():
        from safetensors import safe_open

        files = [st] if st.exists() else sorted(
            {folder / f for f in json.loads(st_index.read_text())["weight_map"].values()})
        state = {}
        for f in files:
            try:
                # framework="flax" reads bfloat16 too (numpy has no bfloat16).
                with safe_open(str(f), framework="flax") as fh:
                    for k in fh.keys():
                        state[k] = fh.get_tensor(k)
            except Exception as e:  # SafetensorError, OSError: a bad file, named in one line
                raise _unreadable_weights(f, e) from None
        return state
    if pt.exists() or pt_index.exists():
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"{folder} holds pytorch_model.bin weights, which need torch to read; "
                "`pip install torch` or convert the checkpoint to safetensors"
            ) from None
        files = [pt] if pt.exists() else sorted(
            {folder / f for f in json.loads(pt_index.read_text())["weight_map"].values()})
        state = {}
        for f in files:
            try:
                loaded = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise _unreadable_weights(f, e) from None
            for k, v in loaded.items():
                state[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        return state
    raise FileNotFoundError(
        f"no weights in {folder}: expected one of {', '.join(_WEIGHT_FILES)}"
    )


def load_config(name_or_path: str | os.PathLike):
    """Only the config of a folder or hub id (no weights downloaded)."""
    folder = resolve_folder(name_or_path, allow_patterns=["config.json"])
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no config.json in {folder}")
    return config_from_hf(json.loads(cfg_file.read_text()))


def load_pretrained(name_or_path: str | os.PathLike, dtype=jnp.float32) -> tuple[Any, dict]:
    """An HF causal LM of a supported family (folder or hub id) -> (config, params in `dtype`)."""
    # From the hub: safetensors only, unless the repo has none (then pytorch_model.bin).
    folder = resolve_folder(name_or_path, allow_patterns=["config.json", "model.safetensors*"])
    if not any((folder / f).exists() for f in _WEIGHT_FILES) and not Path(name_or_path).is_dir():
        folder = resolve_folder(name_or_path, allow_patterns=["config.json", "pytorch_model.bin*"])
    config = load_config(folder)
    state = _read_state_dict(folder)
    return config, hf_state_dict_to_params(config, state, dtype)


# ----------------------------------------------------------------------------- hub facts (the model card)


def is_hub_id(s: Any) -> bool:
    """A hub repo id ("name" or "org/name"), not a local path: the hub refuses metadata whose
    base_model / datasets are not repos on it."""
    return isinstance(s, str) and bool(_HUB_ID.match(s)) and ".." not in s and not os.path.exists(s)


def license_of(d: Any) -> dict:
    """The license keys a record states (a license id, or a mapping with `license`); {} for none."""
    d = {"license": d} if isinstance(d, str) else d if isinstance(d, Mapping) else {}
    lic = {k: d[k] for k in _LICENSE_KEYS if isinstance(d.get(k), str) and d[k]}
    return lic if "license" in lic else {}


def teacher_license(name_or_path: Any) -> Optional[dict]:
    """{"license": ...} (with license_name / license_link for "other") as the teacher's own card
    (README.md front matter) or config.json states it, else None: from a local folder, the hub
    cache, or the hub when huggingface_hub is online. Never raises, never guesses."""
    import huggingface_hub

    local = os.path.isdir(str(name_or_path))
    if not local and not is_hub_id(name_or_path):
        return None
    for fname in ("README.md", "config.json"):
        try:
            # hf_hub_download: the hub cache only under HF_HUB_OFFLINE, else the hub (raises if absent)
            path = Path(name_or_path, fname) if local else huggingface_hub.hf_hub_download(name_or_path, fname)
            data = (huggingface_hub.metadata_load(path) if fname == "README.md"
                    else json.loads(Path(path).read_text()))
        except Exception as e:  # offline, no such file, a malformed card: no license
            log.info("no license from the teacher's %s (%s: %s)", fname, type(e).__name__, e)
            continue
        if lic := license_of(data):
            return lic
    return None


# ----------------------------------------------------------------------------- saving


def save_pretrained(
    config,
    params: Mapping,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    dtype: Any = None,
    extra_files: Optional[Mapping[str, str | bytes]] = None,
) -> Path:
    """Write an HF folder of the family's class (e.g. GPT2LMHeadModel, LlamaForCausalLM):
    config.json, model.safetensors (+ tokenizer files).

    dtype: weights' dtype in the file (default: as in `params`); `dtype` in config.json
    says the same. extra_files: file name -> text (UTF-8) or bytes, written into the same folder
    last (e.g. the model card `README.md`). Written atomically (`fsio.atomic_folder`): all files
    appear together or none do.
    """
    from safetensors.flax import save_file

    state = params_to_hf_state_dict(config, params, dtype)
    file_dtype = jnp.dtype(next(iter(state.values())).dtype)
    hf = config_to_hf(config)
    # transformers >= 4.56 calls it `dtype`, older releases `torch_dtype`.
    setattr(hf, "dtype" if "dtype" in hf.to_dict() or hasattr(hf, "dtype") else "torch_dtype", file_dtype.name)
    with fsio.atomic_folder(out_dir) as tmp:
        hf.save_pretrained(tmp)
        # Contiguous host copies; "format": "pt" is what transformers expects in the metadata.
        save_file({k: jnp.asarray(v) for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        try:
            import transformers

            transformers.GenerationConfig.from_model_config(hf).save_pretrained(tmp)
        except Exception as e:  # generation config is a convenience; never fail the export on it
            log.warning("could not write generation_config.json: %s", e)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            target = (tmp / name).resolve()
            if tmp.resolve() not in target.parents:
                raise ValueError(f"extra file {name!r} would be written outside the model folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
    return Path(out_dir)
