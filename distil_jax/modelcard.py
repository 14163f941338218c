"""The model card (`README.md`) of an exported student, generated from the run's own records.

`model_card(summary, config, export=...)` fills `templates/model_card.md.jinja` (Distily's
sections: summary, architecture, evaluation, resource usage, teacher -> student, train dataset,
objective, hyperparameters, framework versions) under hub metadata built with
`huggingface_hub.ModelCardData` (the end-of-run perplexities as `EvalResult`s), from:

- `summary`: the run's `run_summary.json` (written by training; any key may be missing),
- `config`: the run's full config (`WORKDIR/config.json`, a nested dict),
- `export`: facts about this export (step, dtype, params, weight_bytes, student_config, versions,
  exported_at, and `teacher_license`, what `teacher_license()` found).

Every figure comes from those records. A missing one says "not recorded in this run"; a section
whose records are malformed says it could not be rendered. The generator never raises on its
inputs (Distily's crashes when no benchmarks ran, and bolds the highest perplexity as the best;
here the best is the lowest).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

NOT_RECORDED = "not recorded in this run"
# Packages the card lists first, in this order (then any others the run recorded).
FRAMEWORKS = ("distil_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers",
              "datasets")
_SECRET_KEY = re.compile(r"(^|[_.-])(token|secret|password|api_key|apikey|credentials?)$", re.I)
_LICENSE_KEYS = ("license", "license_name", "license_link")  # license "other" names the license
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")

# ----------------------------------------------------------------------------- formatting
# The template's filters: each takes any record (a missing one is None or jinja's Undefined).


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    """d[k0][k1]... or `default` when any level is missing, None or not a mapping."""
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return default
        d = d[k]
    return default if d is None else d


def _num(x: Any) -> Optional[float]:
    try:
        return None if isinstance(x, bool) or x is None else float(x)
    except Exception:  # not a number, or jinja's Undefined
        return None


def _int(n: Any) -> str:
    v = _num(n)
    return NOT_RECORDED if v is None else f"{int(v):,}" if v == int(v) else f"{v:,}"


def _ppl(x: Any) -> str:
    v = _num(x)
    if v is None or not math.isfinite(v):
        return "—" if v is None else str(v)
    return f"{v:,.2f}" if abs(v) >= 10 else f"{v:.4f}"


def _bytes(n: Any) -> str:
    v = _num(n)
    if v is None:
        return NOT_RECORDED
    size, e = v, 0
    while size >= 1024 and e < 4:
        size, e = size / 1024, e + 1
    human = f"{size:.2f} {('KiB', 'MiB', 'GiB', 'TiB')[e - 1]}" if e else f"{int(v)} B"
    return f"{human} ({int(v):,} bytes)"


def _duration(s: Any) -> str:
    v = _num(s)
    if v is None:
        return NOT_RECORDED
    m, sec = divmod(int(round(v)), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d} ({v:,.1f} s)"


def _value(v: Any) -> str:
    """A config value as compact text (JSON where possible)."""
    if isinstance(v, str):
        return v or '""'
    try:
        return json.dumps(v, default=str)
    except (TypeError, ValueError):
        return str(v)


def _esc(x: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(x).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _cell(v: Any) -> str:
    """A record in a table cell (NOT_RECORDED when missing or empty)."""
    import jinja2

    return _esc(NOT_RECORDED if v is None or v == "" or isinstance(v, jinja2.Undefined) else _value(v))


def _table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(map(_esc, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(_esc, row)) + " |" for row in rows])


def _code(text: str, lang: str = "") -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text}\n{fence}"


def _redact(d: Any) -> Any:
    """A copy of a nested config with secret-looking keys (`*_token`, `password`, ...) hidden."""
    if isinstance(d, Mapping):
        return {k: "<redacted>" if _SECRET_KEY.search(str(k)) and isinstance(v, str) and v else _redact(v)
                for k, v in d.items()}
    return [_redact(v) for v in d] if isinstance(d, (list, tuple)) else d


def _is_hub_id(s: Any) -> bool:
    """A hub repo id ("name" or "org/name"), not a local path: the hub refuses metadata whose
    base_model / datasets are not repos on it."""
    return isinstance(s, str) and bool(_HUB_ID.match(s)) and ".." not in s and not os.path.exists(s)


# ----------------------------------------------------------------------------- model structure


def _hf_config(cfg: Any):
    """An HF config dict (as the run recorded it) -> the distil_jax config, or None."""
    if not isinstance(cfg, Mapping) or not cfg:
        return None
    from distil_jax import hf

    return hf.config_from_hf({"model_type": "gpt2", **cfg})  # the first releases' records lack it


def _architecture(cfg) -> str:
    from distil_jax import models

    return models.family(cfg).HF_ARCHITECTURES[cfg.model_type]


def _arch_facts(cfg) -> dict[str, Any]:
    return {"layers": cfg.num_layers, "width": cfg.width, "query heads": cfg.num_heads,
            "key/value heads": cfg.num_kv_heads, "MLP width": cfg.mlp_width,
            "vocabulary": cfg.vocab_size, "positions": cfg.max_positions}


def module_summary(hf_config: Mapping) -> Optional[str]:
    """A text tree of a model's parameters (HF state-dict names, shapes, counts) in the model's
    order, runs of identical blocks folded into one entry (`transformer.h.0-5 (6 blocks, each: N
    params)`); a tied LM head is listed once, as HF counts it. None without a config."""
    cfg = _hf_config(hf_config)
    if cfg is None:
        return None
    from flax import traverse_util

    from distil_jax import models

    fam = models.family(cfg)
    rows = sorted(((fam.path_to_hf(p), tuple(s.shape)[::-1] if fam.hf_transposed(p) else tuple(s.shape))
                   for p, s in traverse_util.flatten_dict(models.hf_param_shapes(cfg)).items()),
                  key=lambda r: models.hf_order(cfg, r[0]))

    def line(indent: int, name: str, shape: tuple) -> str:
        return f"{'  ' * indent}{name:<{44 - 2 * indent}} {str(list(shape)):<14} {math.prod(shape):>14,}"

    before, after, blocks = [], [], {}
    for name, shape in rows:
        m = re.match(r"(.*?)\.(\d+)\.(.*)", name)  # the first numbered module: the blocks
        if m:
            prefix = m.group(1)
            blocks.setdefault(int(m.group(2)), []).append((m.group(3), shape))
        else:
            (after if blocks else before).append(line(1, name, shape))
    out = [f"{_architecture(cfg):<44} {'shape':<14} {'params':>14}"] + before
    idx, i = sorted(blocks), 0
    while i < len(idx):  # fold consecutive blocks with identical parameter lists
        j = i
        while j + 1 < len(idx) and blocks[idx[j + 1]] == blocks[idx[i]]:
            j += 1
        span = f"{idx[i]} (1 block" if i == j else f"{idx[i]}-{idx[j]} ({j - i + 1} blocks, each"
        out.append(f"  {prefix}.{span}: {sum(math.prod(s) for _, s in blocks[idx[i]]):,} params)")
        out += [line(2, n, s) for n, s in blocks[idx[i]]]
        i = j + 1
    out += after
    if cfg.tie_word_embeddings:
        out.append(f"  {'lm_head.weight':<42} tied to {fam.path_to_hf(fam.lm_head_path(cfg))} (counted once)")
    out.append(f"  {'total':<42} {'':<14} {sum(math.prod(s) for _, s in rows):>14,}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- metadata


class _Facts:
    """The figures several parts of the card show, each from the run summary first, then the
    config or this export's facts. The model configs are parsed when a section asks, so a
    malformed one makes only the sections that read it say they could not be rendered."""

    def __init__(self, summary: Mapping, config: Mapping, export: Mapping):
        self.summary, self.config, self.export = summary, config, export
        self.teacher = teacher_of(summary, config)
        self.uri = _get(summary, "dataset", "uri") or _get(config, "dataset", "uri")
        self.steps, self.t_params = _get(summary, "steps"), _get(summary, "teacher", "params")
        self.s_params = _get(summary, "student", "params", default=_get(export, "params"))
        self.t_hf = _get(summary, "teacher", "config") or None
        self.s_hf = _get(summary, "student", "config") or _get(export, "student_config") or None

    @functools.cached_property
    def t_cfg(self):
        return _hf_config(self.t_hf)

    @functools.cached_property
    def s_cfg(self):
        return _hf_config(self.s_hf)

    def layers(self, who: str) -> Any:
        cfg = self.t_cfg if who == "teacher" else self.s_cfg
        return _get(self.summary, who, "n_layer", default=None if cfg is None else cfg.num_layers)


def teacher_of(summary: Mapping, config: Mapping) -> Optional[str]:
    """The teacher's hub id or folder, as the run recorded it."""
    return _get(summary, "teacher", "name_or_path") or _get(config, "teacher", "model_name_or_path")


def _card_data(f: _Facts, model_name: Optional[str]):
    """The hub metadata: a transformers text-generation model whose base is the teacher; a license
    only where the run's config (`license`) or the teacher's own card states one; the end-of-run
    perplexities as model-index results when they were measured on the exported weights."""
    from huggingface_hub import EvalResult, ModelCardData

    lic = _get(f.config, "license") or _get(f.export, "teacher_license") or {}
    lic = {"license": lic} if isinstance(lic, str) else lic if isinstance(lic, Mapping) else {}
    ev, step, results = _get(f.summary, "evaluation"), _get(f.export, "step"), []
    for name, entry in (ev.items() if isinstance(ev, Mapping) and _num(step) == _num(f.steps) else ()):
        ppl = _num(_get(entry, "student_end", "ppl"))
        uri = _get(f.config, "eval", "evaluators", name, "uri") or (f.uri if name == "heldout" else None)
        if ppl is not None and math.isfinite(ppl):
            results.append(EvalResult(
                task_type="text-generation", dataset_type=uri if _is_hub_id(uri) else name,
                dataset_name=name, dataset_split="held-out test split" if name == "heldout" else None,
                metric_type="perplexity", metric_name="perplexity (token-weighted)", metric_value=ppl))
    return ModelCardData(
        base_model=f.teacher if _is_hub_id(f.teacher) else None, library_name="transformers",
        datasets=[f.uri] if _is_hub_id(f.uri) else None, pipeline_tag="text-generation",
        tags=["distillation", "distil_jax", str(_get(f.s_hf, "model_type", default="gpt2"))],
        model_name=(model_name or "distil_jax student") if results else None, eval_results=results or None,
        **{k: v for k, v in lic.items() if k in _LICENSE_KEYS and isinstance(v, str)})


def teacher_license(name_or_path: Any) -> Optional[dict]:
    """{"license": ...} (with license_name / license_link for "other") as the teacher's own card
    (README.md front matter) or config.json states it, else None: from a local folder, the hub
    cache, or the hub when huggingface_hub is online. Never raises, never guesses."""
    import huggingface_hub

    local = os.path.isdir(str(name_or_path))
    if not local and not _is_hub_id(name_or_path):
        return None
    for fname in ("README.md", "config.json"):
        try:
            if local:
                path = Path(name_or_path) / fname
            else:
                path = huggingface_hub.try_to_load_from_cache(name_or_path, fname)
                if not isinstance(path, str) and not huggingface_hub.constants.is_offline_mode():
                    path = huggingface_hub.hf_hub_download(name_or_path, fname)
            if not isinstance(path, (str, Path)) or not os.path.isfile(path):
                continue
            data = (huggingface_hub.ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
                    if fname == "README.md" else json.loads(Path(path).read_text()))
        except Exception as e:  # offline, no such file, a malformed card: no license
            log.info("no license from the teacher's %s (%s: %s)", fname, type(e).__name__, e)
            continue
        lic = {k: v for k, v in data.items() if k in _LICENSE_KEYS and isinstance(v, str) and v} \
            if isinstance(data, dict) else {}
        if lic.get("license"):
            return lic
    return None


# ----------------------------------------------------------------------------- sections
# What the template cannot read from the records directly, one function per section.


def _objective_line(obj: Any) -> Optional[str]:
    """'logits: kl × 1; attn: raw_mse × 5 (layer-2, ...)' from the objective config."""
    if not isinstance(obj, Mapping):
        return None
    parts = []
    for name in ("logits", "hs", "attn"):
        comp, w = obj.get(name), _num(_get(obj, name, "weight"))
        if isinstance(comp, Mapping) and w:
            extra = ", ".join(str(comp[k]) for k in ("layer_mapper", "norm", "projector") if comp.get(k))
            parts.append(f"{name}: {comp.get('loss_fn', '?')} × {w:g}" + (f" ({extra})" if extra else ""))
    if _num(obj.get("clm_weight")):
        parts.append(f"hard next-token cross-entropy × {_num(obj['clm_weight']):g}")
    if _num(obj.get("temperature")) not in (None, 1):
        parts.append(f"temperature {_num(obj['temperature']):g}")
    return "; ".join(parts) or None


def _summary_section(f: _Facts) -> dict:
    ev, final = _get(f.summary, "evaluation"), []
    for n, e in ev.items() if isinstance(ev, Mapping) else ():
        s, t = _num(_get(e, "student_end", "ppl")), _num(_get(e, "teacher", "ppl"))
        if s is not None:
            final.append(f"{n}: student {_ppl(s)}" + (f" vs teacher {_ppl(t)}" if t is not None else ""))
    seen = _get(f.summary, "resources", "train_tokens")
    real = _num(_get(f.summary, "dataset", "train", "real_tokens"))
    return dict(arch=_architecture(f.s_cfg) if f.s_cfg is not None else None, final="; ".join(final),
                t_layers=f.layers("teacher"), s_layers=f.layers("student"),
                epochs=_num(seen) / real if _num(seen) is not None and real else None,
                objective=_objective_line(_get(f.config, "objective")))


def _architecture_section(f: _Facts) -> dict:
    cfg = f.s_cfg
    rows = [] if cfg is None else [("model type", cfg.model_type),
                                   *((k, _int(v)) for k, v in _arch_facts(cfg).items()),
                                   ("tied LM head", str(cfg.tie_word_embeddings).lower())]
    return dict(arch=_architecture(cfg) if cfg is not None else None, rows=rows,
                dtype=_get(f.export, "dtype") or _get(f.s_hf, "dtype") or _get(f.s_hf, "torch_dtype"),
                tree=_code(module_summary(f.s_hf)) if cfg is not None else None)


def _eval_table(ev: Mapping, names: list, rows: list, metric: str) -> str:
    """One row per model, one column per evaluator; each column's lowest (best) figure bold."""
    cols = []
    for n in names:
        vals = [_num(_get(ev[n], k, metric)) for k, _ in rows]
        best = min((v for v in vals if v is not None and math.isfinite(v)), default=None)
        cols.append([f"**{_ppl(v)}**" if v is not None and v == best else _ppl(v) for v in vals])
    return _table([[label] + [c[i] for c in cols] for i, (_, label) in enumerate(rows)], ["model"] + names)


def _evaluation_section(f: _Facts) -> dict:
    ev = _get(f.summary, "evaluation")
    names = [n for n, e in ev.items() if isinstance(e, Mapping)] if isinstance(ev, Mapping) else []
    keys = list(dict.fromkeys(k for n in names for k, v in ev[n].items() if isinstance(v, Mapping)))
    steps = next((s for n in names if (s := _get(ev[n], "student_end", "step")) is not None), f.steps)
    named = _get(f.summary, "teacher", "name_or_path")
    labels = {"teacher": f"teacher ({named})" if named else "teacher",
              "student_start": "student, before training (step 0)",
              "student_end": "student, end of training" + ("" if steps is None else f" (step {_int(steps)})")}
    rank = {"teacher": "0", "student_start": "1", "student_end": "3"}
    rows = [(k, labels.get(k, k.replace("_", " "))) for k in sorted(keys, key=lambda k: rank.get(k, "2" + k))]
    counts = {}
    for n in names:
        got = {(_get(ev[n], k, "documents"), _get(ev[n], k, "tokens")) for k, _ in rows} - {(None, None)}
        counts[n] = "; ".join(f"{_int(d)} documents, {_int(t)} predicted tokens"
                              for d, t in sorted(got, key=str)) or "document and token counts " + NOT_RECORDED
    fm = _get(f.summary, "final_metrics")
    flat = _flat(fm) if isinstance(fm, Mapping) else []
    distily = any(_num(_get(ev[n], k, "distily_ppl")) is not None for n in names for k, _ in rows)
    return dict(names=names, counts=counts, ppl=_eval_table(ev, names, rows, "ppl") if names else None,
                distily=_eval_table(ev, names, rows, "distily_ppl") if distily else None,
                metrics=_table([(k, f"{v:.6g}" if isinstance(v, float) else _value(v)) for k, v in flat],
                               ["metric", "value"]) if flat else None)


def _flat(d: Mapping) -> list[tuple[str, Any]]:
    """[("a.b.c", leaf)] of a nested dict, in insertion order; an empty dict is a leaf ({})."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(dict(d), keep_empty_nodes=True, sep=".")
    return [(k, {} if v is traverse_util.empty_node else v) for k, v in flat.items()]


def _diff_section(f: _Facts) -> dict:
    if f.t_params is None and f.t_cfg is None:
        return {}
    rows = [("parameters", f.t_params, f.s_params), ("layers", f.layers("teacher"), f.layers("student"))]
    if f.t_cfg is not None and f.s_cfg is not None:
        t, s = _arch_facts(f.t_cfg), _arch_facts(f.s_cfg)
        rows += [(k, t[k], s[k]) for k in list(t)[1:]]
    diff = None
    if f.t_cfg is not None and f.s_cfg is not None:
        lines = difflib.unified_diff(module_summary(f.t_hf).splitlines(), module_summary(f.s_hf).splitlines(),
                                     "teacher", "student", lineterm="")
        diff = _code("\n".join(lines) or "(identical)", "diff")
    ratio = lambda a, b: "—" if _num(b) is None or not _num(a) else f"{_num(b) / _num(a):.3f}"  # noqa: E731
    return dict(table=_table([(k, _int(a), _int(b), ratio(a, b)) for k, a, b in rows],
                             ["", "teacher", "student", "student / teacher"]), diff=diff)


def _config_sections(f: _Facts) -> dict:
    obj, config = _get(f.config, "objective"), _redact(f.config)
    def versions(v):
        if not isinstance(v, Mapping):
            return []
        return [(k, v[k]) for k in [k for k in FRAMEWORKS if k in v] + sorted(set(v) - set(FRAMEWORKS))]

    return dict(objective=_objective_line(obj), trained=versions(_get(f.summary, "versions")),
                objective_json=_code(json.dumps(_redact(obj), indent=2, default=str), "json")
                if isinstance(obj, Mapping) and obj else None,
                hparams=_table([(k, _value(v)) for k, v in _flat(config)], ["config key", "value"])
                if config else None, exported=versions(_get(f.export, "versions")))


_SECTIONS = {"summary_": _summary_section, "arch": _architecture_section, "ev": _evaluation_section,
             "diff": _diff_section, "cfg": _config_sections}


@functools.cache
def _template():
    import jinja2

    # An Environment, not ModelCard.from_template's bare jinja2.Template: block tags on their own
    # lines (trim_blocks), filters, and a missing record that renders as "not recorded" instead
    # of raising (ChainableUndefined: summary.a.b.c is undefined wherever a level is missing).
    env = jinja2.Environment(loader=jinja2.PackageLoader("distil_jax", "templates"), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.ChainableUndefined)
    env.filters.update(count=_int, ppl=_ppl, bytes=_bytes, duration=_duration, value=_value, cell=_cell,
                       layers=lambda n: f"{_int(n)} layer{'' if _num(n) == 1 else 's'}",
                       percent=lambda x: NOT_RECORDED if _num(x) is None else f"{100 * _num(x):.1f}%")
    env.tests["known"] = lambda x: x is not None and not isinstance(x, jinja2.Undefined)
    return env.get_template("model_card.md.jinja")


def model_card(summary: Mapping | None, config: Mapping | None, *, export: Mapping | None = None,
               model_name: str | None = None) -> str:
    """The card's markdown (YAML front matter + sections), from the run's records.

    Args:
      summary: the run's `run_summary.json` as a dict ({} if the run wrote none).
      config: the run's full config as a nested dict ({} if unknown).
      export: this export's facts (see the module docstring). Optional.
      model_name: the hub repo id or folder name, for the title and the loading snippet.
    """
    from huggingface_hub import ModelCardData

    summary, config, export = (d if isinstance(d, Mapping) else {} for d in (summary, config, export))
    f = _Facts(summary, config, export)
    try:
        data = _card_data(f, model_name)
    except Exception as e:  # never fail the export on the card
        log.warning("model card metadata: %s: %s", type(e).__name__, e)
        data = ModelCardData(library_name="transformers", tags=["distillation", "distil_jax"])
    ctx = {}
    for name, fn in _SECTIONS.items():
        try:
            ctx[name] = fn(f)
        except Exception as e:  # a malformed record: that section says so
            log.warning("model card section %s: %s: %s", name, type(e).__name__, e)
            ctx[name] = {"error": "This section could not be rendered from the run's records "
                                  f"({type(e).__name__})."}
    return _template().render(card_data=data.to_yaml(), f=f, summary=summary, config=config, export=export,
                              model_name=model_name, name_repr=repr(model_name), NR=NOT_RECORDED, **ctx)
