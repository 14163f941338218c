"""The model card (`README.md`) of an exported student, generated from the run's own records.

`model_card(summary, config, export=...)` renders Distily's card sections (summary, architecture,
evaluation, resource usage, teacher -> student difference, train dataset, objective,
hyperparameters, framework versions) from:

- `summary`: the run's `run_summary.json` (written by training; any key may be missing),
- `config`: the run's full config (`WORKDIR/config.json`, a nested dict),
- `export`: facts about this export (step, dtype, parameter count, weight bytes, versions).

Every figure comes from those records; nothing is a default. A section (or a single figure) with
no record says "not recorded in this run", and the generator never raises on missing or
malformed records: a section that cannot be rendered says so instead (Distily's card generator
crashes when no benchmarks ran, reads the teacher's dtype from the student and bolds the highest
perplexity as best; here the best perplexity is the lowest).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

NOT_RECORDED = "not recorded in this run"

# Packages the card lists first, in this order (then any others the run recorded).
FRAMEWORKS = ("distil_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers",
              "datasets")
_SECRET_KEY = re.compile(r"(^|[_.-])(token|secret|password|api_key|apikey|credentials?)$", re.I)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


# ----------------------------------------------------------------------------- small helpers


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    """d[k0][k1]... or `default` when any level is missing or not a mapping."""
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return default
        d = d[k]
    return default if d is None else d


def _num(x: Any) -> Optional[float]:
    """x as a finite-or-infinite float, or None when it is not a number."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _int(n: Any) -> str:
    v = _num(n)
    if v is None:
        return NOT_RECORDED
    return f"{int(v):,}" if v == int(v) else f"{v:,}"


def _ppl(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "—"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf"
    return f"{v:,.2f}" if abs(v) >= 10 else f"{v:.4f}"


def _layers(n: Any) -> str:
    return f"{_int(n)} layer{'' if _num(n) == 1 else 's'}"


def _short(v: Any) -> str:
    """A metric value: floats to 6 significant digits."""
    if isinstance(v, float):
        return f"{v:.6g}"
    return _value(v)


def _bytes(n: Any) -> str:
    v = _num(n)
    if v is None:
        return NOT_RECORDED
    size, unit = v, "B"
    for u in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, u
    human = f"{size:.2f} {unit}" if unit != "B" else f"{int(v)} B"
    return f"{human} ({int(v):,} bytes)"


def _duration(s: Any) -> str:
    v = _num(s)
    if v is None:
        return NOT_RECORDED
    h, rem = divmod(int(round(v)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d} ({v:,.1f} s)"


def _value(v: Any) -> str:
    """A config value as compact text (JSON where possible)."""
    if isinstance(v, str):
        return v if v else '""'
    try:
        return json.dumps(v, sort_keys=False, default=str)
    except (TypeError, ValueError):
        return str(v)


def _cell(x: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(x).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _code(text: str, lang: str = "") -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text}\n{fence}"


def _dotted(d: Mapping) -> list[tuple[str, Any]]:
    """[("a.b.c", leaf)] of a nested dict, in insertion order; an empty dict is a leaf ({})."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(dict(d), keep_empty_nodes=True, sep=".")
    return [(k, {} if v is traverse_util.empty_node else v) for k, v in flat.items()]


def _redact(d: Any) -> Any:
    """A copy of a nested config with secret-looking keys (`*_token`, `password`, ...) hidden."""
    if isinstance(d, Mapping):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) and isinstance(v, str) and v
                    else _redact(v)) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_redact(v) for v in d]
    return d


def _is_hub_id(s: Any) -> bool:
    """A hub repo id ("name" or "org/name") and not a local folder: the hub refuses front matter
    whose base_model / datasets are not repos on it."""
    import os

    return isinstance(s, str) and bool(_HUB_ID.match(s)) and ".." not in s and not os.path.exists(s)


# ----------------------------------------------------------------------------- module summary


def _hf_config(cfg: Any):
    """An HF config dict (as the run recorded it) -> the distil_jax config, or None."""
    if not isinstance(cfg, Mapping) or not cfg:
        return None
    from distil_jax import hf

    d = dict(cfg)
    d.setdefault("model_type", "gpt2")  # records of the first releases, GPT-2 only, lack it
    return hf.config_from_hf(d)


def _architecture(cfg) -> str:
    """The transformers class a config loads as, e.g. "LlamaForCausalLM"."""
    from distil_jax import models

    return models.family(cfg).HF_ARCHITECTURES[cfg.model_type]


def arch_facts(cfg) -> dict[str, Any]:
    """The architecture in a few generic figures (the card's tables), for any family."""
    return {"layers": cfg.num_layers, "width": cfg.width, "query heads": cfg.num_heads,
            "key/value heads": cfg.num_kv_heads, "MLP width": cfg.mlp_width,
            "vocabulary": cfg.vocab_size, "positions": cfg.max_positions}


def param_table(hf_config: Mapping) -> Optional[list[tuple[str, tuple[int, ...]]]]:
    """[(HF state-dict name, shape)] of a config (no allocation), or None if no config.

    A tied LM head is listed once, as the token embedding (as HF counts and saves it).
    """
    cfg = _hf_config(hf_config)
    if cfg is None:
        return None
    from flax import traverse_util

    from distil_jax import models

    fam = models.family(cfg)
    rows = []
    for path, sds in traverse_util.flatten_dict(models.param_shapes(cfg)).items():
        shape = tuple(int(d) for d in sds.shape)
        rows.append((fam.path_to_hf(path), shape[::-1] if fam.hf_transposed(path) else shape))
    return sorted(rows, key=lambda r: _order(r[0]))


_MODULE_ORDER = ("wte", "embed_tokens", "wpe", "h", "layers", "ln_1", "input_layernorm", "attn",
                 "self_attn", "c_attn", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "o_proj",
                 "ln_2", "post_attention_layernorm", "mlp", "c_fc", "gate_proj", "up_proj",
                 "down_proj", "c_proj", "ln_f", "norm", "lm_head", "weight", "bias")


def _order(name: str) -> tuple:
    """Sort key giving the model's own order: embeddings, block 0 (norm, attention, norm, MLP),
    ..., the final norm, the head."""
    key = []
    for part in name.split(".")[1 if name.startswith(("transformer.", "model.")) else 0:]:
        if part.isdigit():
            key.append((0, int(part), ""))
        elif part in _MODULE_ORDER:
            key.append((1, _MODULE_ORDER.index(part), ""))
        else:
            key.append((2, 0, part))
    return tuple(key)


def module_summary(hf_config: Mapping) -> Optional[str]:
    """A compact text tree of a model's parameters: module paths, shapes and counts, with runs of
    identical blocks folded into one entry (`transformer.h.0-5 (6 blocks, each: N params)`)."""
    rows = param_table(hf_config)
    if rows is None:
        return None
    cfg = _hf_config(hf_config)
    blocks: dict[int, list[tuple[str, tuple]]] = {}
    top_before, top_after = [], []
    for name, shape in rows:
        m = re.match(r"(.*?)\.(\d+)\.(.*)", name)  # the first numbered module: the blocks
        if m:
            prefix = m.group(1)
            blocks.setdefault(int(m.group(2)), []).append((m.group(3), shape))
        elif blocks:
            top_after.append((name, shape))
        else:
            top_before.append((name, shape))

    def line(indent: int, name: str, shape: tuple) -> str:
        n = math.prod(shape)
        return f"{'  ' * indent}{name:<{44 - 2 * indent}} {str(list(shape)):<14} {n:>14,}"

    total = sum(math.prod(s) for _, s in rows)
    out = [f"{_architecture(cfg):<44} {'shape':<14} {'params':>14}"]
    out += [line(1, n, s) for n, s in top_before]
    # Fold consecutive blocks with identical parameter lists.
    idx = sorted(blocks)
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and blocks[idx[j + 1]] == blocks[idx[i]]:
            j += 1
        k = j - i + 1
        span = f"{idx[i]}" if k == 1 else f"{idx[i]}-{idx[j]}"
        each = sum(math.prod(s) for _, s in blocks[idx[i]])
        out.append(f"  {prefix}.{span} ({k} block{'s, each' if k > 1 else ''}: {each:,} params)")
        out += [line(2, n, s) for n, s in blocks[idx[i]]]
        i = j + 1
    out += [line(1, n, s) for n, s in top_after]
    if cfg.tie_word_embeddings:
        from distil_jax import models

        fam = models.family(cfg)
        out.append(f"  {'lm_head.weight':<42} tied to {fam.path_to_hf(fam.lm_head_path(cfg))} "
                   "(counted once)")
    out.append(f"  {'total':<42} {'':<14} {total:>14,}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- facts


class _Facts:
    """The records, and the figures several sections show, each derived once with its fallbacks
    (the run summary first, then the config or this export's facts). A figure whose record is
    malformed raises when a section reads it, so only that section says it could not be rendered."""

    def __init__(self, summary: Mapping, config: Mapping, export: Mapping, model_name: Optional[str]):
        self.summary, self.config, self.export, self.model_name = summary, config, export, model_name

    @functools.cached_property
    def teacher_name(self) -> Any:
        return _get(self.summary, "teacher", "name_or_path") or _get(self.config, "teacher", "model_name_or_path")

    @functools.cached_property
    def dataset_uri(self) -> Any:
        return _get(self.summary, "dataset", "uri") or _get(self.config, "dataset", "uri")

    @functools.cached_property
    def steps(self) -> Any:
        return _get(self.summary, "steps")

    @functools.cached_property
    def teacher_params(self) -> Any:
        return _get(self.summary, "teacher", "params")

    @functools.cached_property
    def student_params(self) -> Any:
        n = _get(self.summary, "student", "params")
        return _get(self.export, "params") if n is None else n

    @functools.cached_property
    def teacher_hf_config(self) -> Optional[Mapping]:
        """The teacher's HF config dict as recorded, or None."""
        return _get(self.summary, "teacher", "config") or None

    @functools.cached_property
    def student_hf_config(self) -> Optional[Mapping]:
        return _get(self.summary, "student", "config") or _get(self.export, "student_config") or None

    @functools.cached_property
    def teacher_config(self):
        """The teacher's distil_jax model config, or None (raises on an unsupported one)."""
        return _hf_config(self.teacher_hf_config) if self.teacher_hf_config else None

    @functools.cached_property
    def student_config(self):
        return _hf_config(self.student_hf_config) if self.student_hf_config else None

    @functools.cached_property
    def teacher_layers(self) -> Any:
        n = _get(self.summary, "teacher", "n_layer")
        return n if n is not None or self.teacher_config is None else self.teacher_config.num_layers

    @functools.cached_property
    def student_layers(self) -> Any:
        n = _get(self.summary, "student", "n_layer")
        return n if n is not None or self.student_config is None else self.student_config.num_layers


# ----------------------------------------------------------------------------- sections


def _front_matter(f: _Facts) -> str:
    import yaml

    meta: dict[str, Any] = {}
    if _is_hub_id(f.teacher_name):
        meta["base_model"] = f.teacher_name
    if _is_hub_id(f.dataset_uri):
        meta["datasets"] = [f.dataset_uri]
    meta["library_name"] = "distil_jax"
    lic = _get(f.config, "license")
    if isinstance(lic, str) and lic:
        meta["license"] = lic
    meta["pipeline_tag"] = "text-generation"
    s_type = _get(f.student_hf_config, "model_type") or "gpt2"
    meta["tags"] = ["distillation", "distil_jax", str(s_type), "text-generation"]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def _objective_line(obj: Any) -> Optional[str]:
    """'logits: kl × 1.0; attn: raw_mse × 5.0 (layer-2, ...)' from the objective config."""
    if not isinstance(obj, Mapping):
        return None
    parts = []
    for name in ("logits", "hs", "attn"):
        comp = obj.get(name)
        if not isinstance(comp, Mapping):
            continue
        w = _num(comp.get("weight"))
        if not w:
            continue
        extra = [str(comp[k]) for k in ("layer_mapper", "norm", "projector") if comp.get(k)]
        parts.append(f"{name}: {comp.get('loss_fn', '?')} × {w:g}" + (f" ({', '.join(extra)})" if extra else ""))
    clm = _num(obj.get("clm_weight"))
    if clm:
        parts.append(f"hard next-token cross-entropy × {clm:g}")
    t = _num(obj.get("temperature"))
    if t is not None and t != 1:
        parts.append(f"temperature {t:g}")
    return "; ".join(parts) if parts else None


def _final_eval(summary: Mapping) -> Optional[str]:
    ev = _get(summary, "evaluation")
    if not isinstance(ev, Mapping):
        return None
    bits = []
    for name, entry in ev.items():
        t = _num(_get(entry, "teacher", "ppl"))
        s = _num(_get(entry, "student_end", "ppl"))
        if s is not None:
            bits.append(f"{name}: student {_ppl(s)}" + (f" vs teacher {_ppl(t)}" if t is not None else ""))
    return "; ".join(bits) or None


def _summary_section(f: _Facts) -> str:
    summary, config, export, model_name = f.summary, f.config, f.export, f.model_name
    teacher, uri = f.teacher_name, f.dataset_uri
    t_params, s_params, t_layers, s_layers = f.teacher_params, f.student_params, f.teacher_layers, f.student_layers
    ds = _get(summary, "dataset") or {}
    real = _get(ds, "train", "real_tokens")
    docs = _get(ds, "train", "documents")

    arch = _architecture(f.student_config) if f.student_config is not None else None
    lines = []
    lines.append("This model is a student distilled from a teacher with distil_jax (a JAX/Flax "
                 "reimplementation of Distily)." + (f" It is a `{arch}` that loads with `transformers`."
                                                    if arch else ""))
    lines.append("")
    lines.append(f"- **Teacher:** {f'`{teacher}`' if teacher else NOT_RECORDED}"
                 + (f", {_int(t_params)} parameters" if t_params is not None else "")
                 + (f", {_layers(t_layers)}" if t_layers is not None else ""))
    cache = _get(summary, "teacher", "cache")
    if isinstance(cache, Mapping) and cache.get("k"):
        vocab = cache.get("vocab_size")
        lines.append(f"- **Teacher outputs:** read from a top-{cache['k']} teacher cache, not computed "
                     f"during training: the teacher's {cache['k']} most probable next tokens"
                     + (f" of {_int(vocab)}" if vocab else "")
                     + f" at every position ({cache.get('logprobs_dtype', '')} log-probabilities, "
                     f"recorded at temperature {cache.get('temperature', 1.0)}) plus the probability "
                     "mass of the rest as one bucket"
                     + (f" and {cache['tail_samples']} tokens drawn from that rest; the logits loss "
                        "compared the student with the top tokens exactly and estimated the rest's "
                        "share from the drawn tokens (distil_jax docs/teacher_cache.md)"
                        if cache.get("tail_samples") else
                        "; the logits loss compared the student with that coarse-grained "
                        "distribution (distil_jax docs/teacher_cache.md)"))
    lines.append("- **Student:** " + (f"{_int(s_params)} parameters" if s_params is not None
                                       else f"parameter count {NOT_RECORDED}")
                 + (f", {_layers(s_layers)}" if s_layers is not None else ""))
    src = f"`{uri}`" if uri else f"a dataset ({'name ' + NOT_RECORDED})"
    if real is not None or docs is not None:
        lines.append(f"- **Train split:** {_int(real)} real tokens in {_int(docs)} documents of {src}")
    else:
        lines.append(f"- **Train split:** {NOT_RECORDED}")
    steps = f.steps
    seen = _get(summary, "resources", "train_tokens")
    if seen is not None:
        epochs = _num(seen) / _num(real) if _num(real) else None
        lines.append(f"- **Tokens trained on:** {_int(seen)} real tokens"
                     + (f" in {_int(steps)} optimizer steps" if steps is not None else "")
                     + (f" ({epochs:.3g} epochs of the train split)" if epochs is not None else ""))
    else:
        lines.append(f"- **Tokens trained on:** {NOT_RECORDED}"
                     + (f" ({_int(steps)} optimizer steps)" if steps is not None else ""))
    lines.append(f"- **Objective:** {_objective_line(_get(config, 'objective')) or NOT_RECORDED}")
    lines.append(f"- **Final perplexity (token-weighted, lower is better):** "
                 f"{_final_eval(summary) or NOT_RECORDED}")
    if export:
        step = _get(export, "step")
        dt = _get(export, "dtype")
        lines.append("- **This export:** " + (f"checkpoint of step {_int(step)}" if step is not None
                                               else f"checkpoint step {NOT_RECORDED}")
                     + (f", weights in {dt}" if dt else ""))
        if step is not None and steps is not None and _num(step) != _num(steps):
            lines.append(f"- **Note:** this export is the checkpoint of step {_int(step)}, not the end of the "
                         f"run (step {_int(steps)}); the student's end-of-run figures below were measured "
                         f"on the step-{_int(steps)} weights, not on these.")
    started, finished = _get(summary, "started_at"), _get(summary, "finished_at")
    if started or finished:
        lines.append(f"- **Run:** started {started or NOT_RECORDED}, finished {finished or NOT_RECORDED}")
    else:
        lines.append(f"- **Run:** start and finish times {NOT_RECORDED}")
    if model_name:
        lines += ["", "Load it with transformers:", "",
                  _code("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                        f"model = AutoModelForCausalLM.from_pretrained({model_name!r})\n"
                        f"tokenizer = AutoTokenizer.from_pretrained({model_name!r})", "python")]
    return "## Summary\n\n" + "\n".join(lines)


def _architecture_section(f: _Facts) -> str:
    config, export = f.config, f.export
    s_cfg, params = f.student_hf_config, f.student_params
    dtype = _get(export, "dtype") or _get(s_cfg, "dtype") or _get(s_cfg, "torch_dtype")
    cfg = f.student_config
    size = _get(export, "weight_bytes")
    rows = [
        ("class", f"{_architecture(cfg)} (transformers)" if cfg is not None else NOT_RECORDED),
        ("total parameters", _int(params)),
        ("weights dtype (this export)", dtype or NOT_RECORDED),
        ("size of the weights", _bytes(size)),
        ("training compute dtype (config train.dtype)", _get(config, "train", "dtype") or NOT_RECORDED),
        ("teacher weights dtype (config teacher.dtype)", _get(config, "teacher", "dtype") or NOT_RECORDED),
    ]
    if cfg is not None:
        rows += [("model type", cfg.model_type)]
        rows += [(k, _int(v)) for k, v in arch_facts(cfg).items()]
        rows += [("tied LM head", str(cfg.tie_word_embeddings).lower())]
    text = "## Architecture\n\n" + _table(["", "student"], rows)
    tree = module_summary(s_cfg) if s_cfg else None
    text += "\n\nModule summary (parameter names as in the PyTorch state dict):\n\n"
    text += _code(tree) if tree else NOT_RECORDED + "."
    return text


def _eval_rows(entry: Mapping, steps: Any, teacher_name: Any) -> list[tuple[str, str]]:
    """[(model key, row label)] in display order: teacher, student start, others, student end."""
    keys = [k for k, v in entry.items() if isinstance(v, Mapping)]
    end_step = _get(entry, "student_end", "step")
    steps = end_step if end_step is not None else steps
    order = (["teacher"] if "teacher" in keys else []) + (["student_start"] if "student_start" in keys else [])
    order += sorted(k for k in keys if k not in ("teacher", "student_start", "student_end"))
    order += ["student_end"] if "student_end" in keys else []
    labels = {
        "teacher": f"teacher{f' ({teacher_name})' if teacher_name else ''}",
        "student_start": "student, before training (step 0)",
        "student_end": f"student, end of training (step {_int(steps)})" if steps is not None
        else "student, end of training",
    }
    return [(k, labels.get(k, k.replace("_", " "))) for k in order]


def _bold_lowest(values: list[Optional[float]]) -> list[str]:
    """Perplexities as text, the lowest (the best) in bold; ties all bold."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    best = min(finite) if finite else None
    return [f"**{_ppl(v)}**" if v is not None and best is not None and v == best else _ppl(v)
            for v in values]


def _evaluation_section(f: _Facts) -> str:
    summary, config = f.summary, f.config
    ev = _get(summary, "evaluation")
    head = "## Evaluation\n\n"
    if not isinstance(ev, Mapping) or not ev:
        return head + f"Evaluation: {NOT_RECORDED}."
    steps = f.steps
    teacher_name = _get(summary, "teacher", "name_or_path")
    names = [n for n, e in ev.items() if isinstance(e, Mapping)]
    # One row per model across evaluators, in a stable order.
    row_keys: list[tuple[str, str]] = []
    for n in names:
        for k, label in _eval_rows(ev[n], steps, teacher_name):
            if k not in [r[0] for r in row_keys]:
                row_keys.append((k, label))
    order = {"teacher": 0, "student_start": 1, "student_end": 3}
    row_keys.sort(key=lambda kl: order.get(kl[0], 2))

    def table(metric: str) -> str:
        cols = [_bold_lowest([_num(_get(ev[n], k, metric)) for k, _ in row_keys]) for n in names]
        return _table(["model"] + names, [[label] + [c[i] for c in cols] for i, (_, label) in enumerate(row_keys)])

    parts = [head.rstrip()]
    parts.append("Perplexity, **token-weighted**: exp(total negative log-likelihood / total predicted "
                 "tokens) over all of an evaluator's documents. Lower is better; the best (lowest) "
                 "figure of each column is in bold.")
    parts.append(table("ppl"))
    if any(_num(_get(ev[n], k, "distily_ppl")) is not None for n in names for k, _ in row_keys):
        parts.append("For comparison with Distily's cards only: **Distily's perplexity**, computed as "
                     "Distily's evaluator does (each document cut to one token less than a row, with BOS "
                     "prepended, so that its first token is scored too): the mean over documents of each "
                     "document's own perplexity (not token-weighted; short documents weigh as much as "
                     "long ones). Lower is better; lowest in bold.")
        parts.append(table("distily_ppl"))
    measured = []
    for n in names:
        counts = {(_get(ev[n], k, "documents"), _get(ev[n], k, "tokens")) for k, _ in row_keys
                  if isinstance(_get(ev[n], k), Mapping)}
        counts.discard((None, None))
        spec = _get(config, "eval", "evaluators", n)
        if isinstance(spec, Mapping) and spec.get("uri"):
            src = "`" + "`, `".join(str(spec[k]) for k in ("uri", "subset", "split") if spec.get(k)) + "`"
            if spec.get("sample_size"):
                src += f", first {_int(spec['sample_size'])} rows"
        elif n == "heldout":
            src = "the run's held-out test split of the train dataset (never trained on)"
        else:
            src = "source " + NOT_RECORDED
        docs = "documents"  # counted on Distily's evaluator rows: one per document
        if len(counts) == 1:
            d, t = next(iter(counts))
            what = f"{_int(d)} {docs}, {_int(t)} predicted tokens"
        elif counts:
            what = "; ".join(f"{_int(d)} {docs} / {_int(t)} tokens" for d, t in sorted(counts, key=str))
        else:
            what = "document and token counts " + NOT_RECORDED
        measured.append(f"- `{n}`: {src}; {what}.")
    parts.append("What was measured:\n\n" + "\n".join(measured))
    fm = _get(summary, "final_metrics")
    if isinstance(fm, Mapping) and fm:
        parts.append("Last logged training metrics (means over the final logging interval; grad_norm "
                     "and learning_rate at its last step"
                     + (f", up to step {_int(steps)}" if steps is not None else "") + "):\n\n"
                     + _table(["metric", "value"], [(k, _short(v)) for k, v in _dotted(fm)]))
    return "\n\n".join(parts)


def _resources_section(f: _Facts) -> str:
    res = _get(f.summary, "resources")
    head = "## Resource usage\n\n"
    if not isinstance(res, Mapping) or not res:
        return head + f"Resource usage: {NOT_RECORDED}."
    if "peak_memory_bytes" not in res:
        peak = NOT_RECORDED
    elif res["peak_memory_bytes"] is None:
        peak = "not measured (the device reports no memory statistics)"
    else:
        peak = _bytes(res["peak_memory_bytes"])
    kind, count = _get(res, "device_kind"), _get(res, "device_count")
    devices = (f"{_int(count)} × {kind}" if kind and count is not None else kind or
               (_int(count) if count is not None else NOT_RECORDED))
    if _get(res, "platform"):
        devices += f" (platform {res['platform']})"
    tps = _num(_get(res, "tokens_per_s"))
    rows = [
        ("peak accelerator memory (measured during the run)", peak),
        ("devices", devices),
        ("CPUs", _int(_get(res, "cpus")) if _get(res, "cpus") is not None else NOT_RECORDED),
        ("host RAM", _bytes(_get(res, "host_ram_bytes"))),
        ("peak host memory (RSS of the training process)", _bytes(_get(res, "peak_host_rss_bytes"))),
        ("wall time", _duration(_get(res, "wall_time_s"))),
        ("throughput", f"{tps:,.0f} tokens/s" if tps is not None else NOT_RECORDED),
        ("training tokens processed", _int(_get(res, "train_tokens")) if _get(res, "train_tokens") is not None
         else NOT_RECORDED),
    ]
    return head + _table(["", "value"], rows)


def _diff_section(f: _Facts) -> str:
    head = "## Teacher → student\n\n"
    t_cfg_d, s_cfg_d = f.teacher_hf_config, f.student_hf_config
    t_cfg, s_cfg = f.teacher_config, f.student_config
    t_params, s_params = f.teacher_params, f.student_params
    if t_params is None and t_cfg is None:
        return head + f"The teacher's architecture: {NOT_RECORDED}."

    def ratio(a, b):
        a, b = _num(a), _num(b)
        return f"{a / b:.3f}" if a is not None and b else "—"

    rows = [("parameters", _int(t_params), _int(s_params), ratio(s_params, t_params))]
    rows.append(("layers", _int(f.teacher_layers), _int(f.student_layers),
                 ratio(f.student_layers, f.teacher_layers)))
    if t_cfg is not None and s_cfg is not None:
        t_facts, s_facts = arch_facts(t_cfg), arch_facts(s_cfg)
        for name in list(t_facts)[1:]:
            rows.append((name, _int(t_facts[name]), _int(s_facts[name]), ratio(s_facts[name], t_facts[name])))
    text = head + _table(["", "teacher", "student", "student / teacher"], rows)
    t_tree = module_summary(t_cfg_d) if t_cfg is not None else None
    s_tree = module_summary(s_cfg_d) if s_cfg is not None else None
    if t_tree and s_tree:
        diff = "\n".join(difflib.unified_diff(t_tree.splitlines(), s_tree.splitlines(), "teacher", "student",
                                              lineterm=""))
        text += "\n\nModule summaries, teacher → student (unified diff):\n\n"
        text += _code(diff or "(identical)", "diff")
    else:
        text += f"\n\nModule diff: {NOT_RECORDED} (the teacher's or the student's config is missing)."
    return text


def _dataset_section(f: _Facts) -> str:
    ds = _get(f.summary, "dataset") or {}
    cds = _get(f.config, "dataset") or {}
    head = "## Train dataset\n\n"
    if not ds and not cds:
        return head + f"The train dataset: {NOT_RECORDED}."

    def field(k):
        v = _get(ds, k)
        if v is None:
            v = _get(cds, k)
        return _value(v) if v is not None and not isinstance(v, str) else (v or NOT_RECORDED)

    rows = [("uri", field("uri")), ("subset", field("subset")), ("split", field("split")),
            ("column", field("column")), ("layout", field("layout")),
            ("sequence length", field("seq_len") if _get(ds, "seq_len") is not None
             else NOT_RECORDED)]
    for k in ("sample_size", "test_size", "shuffle", "seed"):
        if k in cds:
            rows.append((f"config dataset.{k}", _value(cds[k])))
    split_rows = []
    for split in ("train", "test"):
        s = _get(ds, split)
        if isinstance(s, Mapping):
            pf = _num(s.get("padding_fraction"))
            split_rows.append((split, _int(s.get("documents")) if s.get("documents") is not None else NOT_RECORDED,
                               _int(s.get("real_tokens")) if s.get("real_tokens") is not None else NOT_RECORDED,
                               _int(s.get("rows")) if s.get("rows") is not None else NOT_RECORDED,
                               f"{100 * pf:.1f}%" if pf is not None else NOT_RECORDED))
    text = head + _table(["", "value"], rows)
    if split_rows:
        text += ("\n\nReal tokens are the tokens trained on (padding excluded; every loss is masked to "
                 "them).\n\n" + _table(["split", "documents", "real tokens", "rows", "padding"], split_rows))
    else:
        text += f"\n\nDocument and token counts: {NOT_RECORDED}."
    return text


def _objective_section(f: _Facts) -> str:
    obj = _get(f.config, "objective")
    head = "## Training objective\n\n"
    if not isinstance(obj, Mapping) or not obj:
        return head + f"The objective: {NOT_RECORDED}."
    line = _objective_line(obj)
    text = head + (f"Loss = {line}.\n\n" if line else "")
    text += "The full objective config:\n\n" + _code(json.dumps(_redact(obj), indent=2, default=str), "json")
    return text


def _hparams_section(f: _Facts) -> str:
    config = f.config
    head = "## Hyperparameters\n\n"
    if not isinstance(config, Mapping) or not config:
        return head + f"The run's config: {NOT_RECORDED}."
    rows = [(k, _value(v)) for k, v in _dotted(_redact(config))]
    return head + "Every value of the run's config (`config.json` in the run's workdir):\n\n" + \
        _table(["config key", "value"], rows)


def _versions_section(f: _Facts) -> str:
    head = "## Framework versions\n\n"
    ver = _get(f.summary, "versions")
    parts = []
    if isinstance(ver, Mapping) and ver:
        keys = [k for k in FRAMEWORKS if k in ver] + sorted(k for k in ver if k not in FRAMEWORKS)
        parts.append("Used for training:\n\n" + "\n".join(f"- {k} {ver[k]}" for k in keys))
    else:
        parts.append(f"Used for training: {NOT_RECORDED}.")
    ex = _get(f.export, "versions")
    if isinstance(ex, Mapping) and ex:
        keys = [k for k in FRAMEWORKS if k in ex] + sorted(k for k in ex if k not in FRAMEWORKS)
        parts.append("Used for this export:\n\n" + "\n".join(f"- {k} {ex[k]}" for k in keys))
    return head + "\n\n".join(parts)


_SECTIONS: list[tuple[str, Callable]] = [
    ("Summary", _summary_section),
    ("Architecture", _architecture_section),
    ("Evaluation", _evaluation_section),
    ("Resource usage", _resources_section),
    ("Teacher → student", _diff_section),
    ("Train dataset", _dataset_section),
    ("Training objective", _objective_section),
    ("Hyperparameters", _hparams_section),
    ("Framework versions", _versions_section),
]


def model_card(summary: Mapping | None, config: Mapping | None, *, export: Mapping | None = None,
               model_name: str | None = None) -> str:
    """The card's markdown (YAML front matter + sections), from the run's records.

    Args:
      summary: the run's `run_summary.json` as a dict ({} if the run wrote none).
      config: the run's full config as a nested dict ({} if unknown).
      export: this export's facts: step, dtype, params (count), weight_bytes, student_config (HF
        config dict), versions (package -> version at export time). Optional.
      model_name: the hub repo id or folder name, for the title and the loading snippet.
    """
    summary = summary if isinstance(summary, Mapping) else {}
    config = config if isinstance(config, Mapping) else {}
    export = export if isinstance(export, Mapping) else {}
    facts = _Facts(summary, config, export, model_name)
    try:
        front = _front_matter(facts)
    except Exception as e:  # never fail the export on the card
        log.warning("model card front matter: %s: %s", type(e).__name__, e)
        front = "---\nlibrary_name: distil_jax\ntags:\n- distillation\n---"
    title = f"# {model_name}" if model_name else "# distil_jax student"
    parts = [front, "", title, ""]
    for name, fn in _SECTIONS:
        try:
            parts.append(fn(facts))
        except Exception as e:  # a malformed record: say so, never crash
            log.warning("model card section %r: %s: %s", name, type(e).__name__, e)
            parts.append(f"## {name}\n\nThis section could not be rendered from the run's records "
                         f"({type(e).__name__}).")
        parts.append("")
    when = _get(export, "exported_at")
    parts.append("_Card generated by distil_jax from the run's records"
                 + (f" at export time {when}._" if when else "._"))
    return "\n".join(parts) + "\n"
