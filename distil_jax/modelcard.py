"""The model card (`README.md`) of an exported student: `templates/model_card.md.jinja` under hub
metadata (`huggingface_hub.ModelCardData`, the model-index as `EvalResult`s), from the run's records:
run_summary.json, config.json, this export's facts (`export`) and evals_downstream.json
(`distil_jax.evaluate`). A missing record says "not recorded in this run", a malformed one makes its
section say it could not be rendered: never an exception. The best perplexity is the lowest (Distily
bolds the highest).
"""

from __future__ import annotations

import json
import logging
import math
import re
from types import SimpleNamespace
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

NOT_RECORDED = "not recorded in this run"
_SECRET_KEY = re.compile(r"(^|[_.-])(token|secret|password|api_key|apikey|credentials?)$", re.I)
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}  # datasets' loaders, not hub repos
_SHAPE = (("layers", "num_layers"), ("width", "width"), ("query heads", "num_heads"),
          ("key/value heads", "num_kv_heads"), ("MLP width", "mlp_width"), ("vocabulary", "vocab_size"),
          ("positions", "max_positions"), ("tied LM head", "tie_word_embeddings"))


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    """d[k0][k1]... or `default` when any level is missing, None or not a mapping."""
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return default
        d = d[k]
    return default if d is None else d


def _num(x: Any) -> Optional[float]:
    """x as a float; None for None, bools and what float() refuses (jinja's Undefined included)."""
    try:
        return None if isinstance(x, bool) or x is None else float(x)
    except Exception:
        return None


def _cell(v: Any, key: str = "") -> str:
    """A record as text: whole numbers with thousands separators, others to 6 digits, sizes (`*_bytes`)
    in bytes and MiB, text as is, the rest as JSON; NOT_RECORDED when missing or empty."""
    n = _num(v)
    if n is None:
        return NOT_RECORDED if v is None or v == "" else v if isinstance(v, str) else json.dumps(v, default=str)
    if key.endswith("_bytes") and math.isfinite(n):
        return f"{int(n):,} bytes ({n / 2 ** 20:,.1f} MiB)"
    return f"{int(n):,}" if math.isfinite(n) and n == int(n) else f"{n:.6g}"


def _table(rows, header) -> str:
    """A markdown table; a cell's `|` and newlines escaped."""
    esc = lambda x: str(x).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join("| " + " | ".join(map(esc, r)) + " |" for r in [header, ["---"] * len(header), *rows])


def _flat(d: Any) -> list[tuple[str, Any]]:
    """[("a.b.c", leaf)] of a nested dict, in insertion order; an empty dict is a leaf ({}); [] for a non-dict."""
    return [(f"{k}.{kk}" if kk else str(k), vv) for k, v in (d.items() if isinstance(d, Mapping) else ())
            for kk, vv in (_flat(v) if isinstance(v, Mapping) and v else [("", v)])]


def _redact(d: Any) -> Any:
    """A copy of a nested config with secret-looking keys (`*_token`, `password`, ...) hidden."""
    if isinstance(d, Mapping):
        return {k: "<redacted>" if _SECRET_KEY.search(str(k)) and isinstance(v, str) and v else _redact(v)
                for k, v in d.items()}
    return [_redact(v) for v in d] if isinstance(d, (list, tuple)) else d


def _records(x: Any, *header: str, config: bool = False) -> Optional[str]:
    """A table of a nested record (resources, dataset, final_metrics), "—" for a value not set; of the run's
    `config`: every value, secrets hidden, text as is and the rest as JSON. None for no rows."""
    rows = [(k, (v if isinstance(v, str) and v else json.dumps(v, default=str)) if config
             else "—" if v is None else _cell(v, k)) for k, v in _flat(_redact(x) if config else x)]
    return _table(rows, header or ["", "value (—: not measured or not set)"]) if rows else None


def _versions(v: Any) -> str:
    """"package version, ..." with distil_jax first; "" when none are recorded."""
    items = sorted(v.items(), key=lambda kv: kv[0] != "distil_jax") if isinstance(v, Mapping) else []
    return ", ".join(f"{k} {x}" for k, x in items)


def teacher_of(summary: Mapping, config: Mapping) -> Optional[str]:
    """The teacher's hub id or folder, as the run recorded it."""
    return _get(summary, "teacher", "name_or_path") or _get(config, "teacher", "model_name_or_path")


def _card_data(r) -> str:
    """The hub metadata (YAML): a transformers text-generation model whose base is the teacher; a license
    only where the run's config (`license`) or the teacher's own card states one; the model-index: the
    student's figures measured on the exported weights only (the end-of-run perplexities when this export
    is the last step; the downstream tasks when they ran on an export of this step)."""
    from huggingface_hub import EvalResult, ModelCardData

    from distil_jax.hf import is_hub_id, license_of

    step, results = _num(_get(r.export, "step")), []
    ev = _get(r.summary, "evaluation") if step == _num(_get(r.summary, "steps")) else None
    for name, entry in ev.items() if isinstance(ev, Mapping) else ():
        ppl = _num(_get(entry, "student_end", "ppl"))
        uri = _get(r.config, "eval", "evaluators", name, "uri") or \
            (_get(r.config, "dataset", "uri") if name == "heldout" else None)
        if ppl is not None and math.isfinite(ppl):
            results.append(EvalResult(
                task_type="text-generation", dataset_type=uri if is_hub_id(uri) else name, dataset_name=name,
                dataset_split="held-out test split" if name == "heldout" else None, metric_type="perplexity",
                metric_name="perplexity (token-weighted)", metric_value=ppl))
    same = step is not None and _num(_get(r.downstream, "student", "step")) == step
    rows = _get(r.downstream, "rows") if same else None
    for row in rows if isinstance(rows, list) else ():
        v, ds, shots = _num(_get(row, "student")), _get(row, "dataset"), _get(row, "num_fewshot")
        if v is not None and math.isfinite(v) and _get(row, "task") and _get(row, "metric"):
            hub = is_hub_id(ds) and ds not in _LOCAL_BUILDERS
            results.append(EvalResult(
                task_type="text-generation", dataset_type=ds if hub else row["task"], dataset_name=row["task"],
                metric_type=row["metric"], metric_value=v, source_name="lm-evaluation-harness",
                source_url="https://github.com/EleutherAI/lm-evaluation-harness",
                metric_name=None if shots is None else f"{row['metric']} ({shots}-shot)"))
    uri = _get(r.summary, "dataset", "uri") or _get(r.config, "dataset", "uri")
    kind = _get(r.summary, "student", "config", "model_type") or _get(r.export, "student_config", "model_type")
    return ModelCardData(
        base_model=r.teacher if is_hub_id(r.teacher) else None, library_name="transformers",
        datasets=[uri] if is_hub_id(uri) else None, pipeline_tag="text-generation",
        tags=["distillation", "distil_jax", str(kind or "gpt2")],
        model_name=(r.name or "distil_jax student") if results else None, eval_results=results or None,
        **(license_of(_get(r.config, "license")) or license_of(_get(r.export, "teacher_license")))).to_yaml()


# ----------------------------------------------------------------------------- sections
# The summary and the record tables (filters above) are the template's; _card_data (above), _architecture
# and _evaluation build the rest from the records `r`, and one that raises (a malformed record) says so instead.


def _objective(obj: Any) -> Optional[str]:
    """'logits: kl × 1; attn: raw_mse × 5 (layer-2, ...)' from the objective config."""
    obj, parts = obj if isinstance(obj, Mapping) else {}, []
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


def _architecture(r) -> Optional[str]:
    """Teacher and student side by side, with the ratio: their classes and the models' generic config
    properties from the HF config dicts as the run recorded them (none without one)."""
    from distil_jax import models

    t = {"parameters": _get(r.summary, "teacher", "params"), "weights dtype": _get(r.config, "teacher", "dtype")}
    s = {"parameters": r.s_params, "weights dtype": _get(r.export, "dtype")}
    for col, hf_config in ((t, _get(r.summary, "teacher", "config")), (s, r.s_hf)):
        if isinstance(hf_config, Mapping) and hf_config:
            cfg = models.config_from_hf({"model_type": "gpt2", **hf_config})  # the first releases' records lack it
            col["class"] = models.family(cfg).HF_ARCHITECTURES[cfg.model_type]
            col.update((k, getattr(cfg, a)) for k, a in _SHAPE)
    if all("class" not in c and c["parameters"] is None for c in (t, s)):
        return None
    rows = [(k, t.get(k), s.get(k)) for k in ("class", "parameters", *dict(_SHAPE), "weights dtype")]
    rows = [(k, _cell(a), _cell(b), f"{_num(b) / _num(a):.3f}" if _num(a) and _num(b) is not None else "")
            for k, a, b in rows]
    rows += [("size of the weights (this export)", "", _cell(_get(r.export, "weight_bytes"), "_bytes"), ""),
             ("training compute dtype (train.dtype)", "", _cell(_get(r.config, "train", "dtype")), "")]
    return _table(rows, ["", "teacher", "student", "student / teacher"])


def _ppl_table(ev: Mapping, names: list, rows: list, metric: str) -> str:
    """One row per model, one column per evaluator; each column's lowest (best) figure bold."""
    fmt = lambda v: "—" if v is None else f"{v:,.2f}" if abs(v) >= 10 else f"{v:.4f}"  # noqa: E731
    cols = []
    for n in names:
        vals = [_num(_get(ev[n], k, metric)) for k, _ in rows]
        best = min((v for v in vals if v is not None and math.isfinite(v)), default=None)
        cols.append([f"**{fmt(v)}**" if v is not None and v == best else fmt(v) for v in vals])
    return _table([(label, *cells) for (_, label), *cells in zip(rows, *cols)], ["model", *names])


def _evaluation(r) -> dict:
    """The perplexity tables (the run's and Distily's figure), what they measured, the downstream table."""
    ev = _get(r.summary, "evaluation")
    names = [n for n, e in ev.items() if isinstance(e, Mapping)] if isinstance(ev, Mapping) else []
    keys = dict.fromkeys(k for n in names for k, v in ev[n].items() if isinstance(v, Mapping))
    step = next((s for n in names if (s := _get(ev[n], "student_end", "step")) is not None),
                _get(r.summary, "steps"))
    who = _get(r.summary, "teacher", "name_or_path")
    labels = {"teacher": f"teacher ({who})" if who else "teacher",
              "student_start": "student, before training (step 0)",
              "student_end": "student, end of training" + ("" if step is None else f" (step {_cell(_num(step))})")}
    rank = {"teacher": "0", "student_start": "1", "student_end": "3"}  # others: between, by name
    rows = [(k, labels.get(k, k.replace("_", " "))) for k in sorted(keys, key=lambda k: rank.get(k, "2" + k))]
    measured = []
    for n in names:
        spec = _get(r.config, "eval", "evaluators", n)
        source = ", ".join(f"`{spec[k]}`" for k in ("uri", "subset", "split") if _get(spec, k)) or (
            "the run's held-out test split (never trained on)" if n == "heldout" else "source " + NOT_RECORDED)
        counts = {(_get(ev[n], k, "documents"), _get(ev[n], k, "tokens")) for k in keys} - {(None, None)}
        counts = "; ".join(f"{_cell(_num(d))} documents, {_cell(_num(t))} predicted tokens"
                           for d, t in sorted(counts, key=str))
        measured.append(f"`{n}`: {source}; {counts or 'counts ' + NOT_RECORDED}")
    distily = any(_num(_get(ev[n], k, "distily_ppl")) is not None for n in names for k in keys)
    down = _get(r.downstream, "rows")
    from distil_jax.evaluate import markdown

    return dict(measured=measured, ppl=names and _ppl_table(ev, names, rows, "ppl"),
                distily=distily and _ppl_table(ev, names, rows, "distily_ppl"),
                downstream=isinstance(down, list) and markdown([x for x in down if isinstance(x, Mapping)]))


def model_card(summary: Mapping | None, config: Mapping | None, *, export: Mapping | None = None,
               downstream: Mapping | None = None, model_name: str | None = None) -> str:
    """The card's markdown (YAML front matter + sections), from the run's records (see the module
    docstring; {} or None for a missing one). `model_name`: the hub repo id or folder name, for
    the title and the loading snippet."""
    import jinja2
    from huggingface_hub import ModelCardData

    summary, config, export, downstream = (d if isinstance(d, Mapping) else {}
                                           for d in (summary, config, export, downstream))
    r = SimpleNamespace(summary=summary, config=config, export=export, downstream=downstream, name=model_name,
                        s_hf=_get(summary, "student", "config") or _get(export, "student_config"),
                        s_params=_get(summary, "student", "params", default=_get(export, "params")),
                        teacher=teacher_of(summary, config), objective=_objective(_get(config, "objective")))
    # The metadata when _card_data raises: the least a hub card needs.
    sections = {"card_data": ModelCardData(library_name="transformers", tags=["distillation", "distil_jax"]).to_yaml()}
    for name, fn in (("card_data", _card_data), ("arch", _architecture), ("ev", _evaluation)):
        try:
            sections[name] = fn(r)
        except Exception as e:  # a malformed record: its section says so, the metadata is the least (never fail)
            log.warning("model card section %s: %s: %s", name, type(e).__name__, e)
            sections.setdefault(name, {"error": "This section could not be rendered from the run's records "
                                                f"({type(e).__name__})."})
    env = jinja2.Environment(loader=jinja2.PackageLoader("distil_jax", "templates"), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.ChainableUndefined)
    env.filters.update(num=_num, cell=_cell, records=_records, versions=_versions)
    return env.get_template("model_card.md.jinja").render(r=r, model_name=model_name,
                                                          name_repr=repr(model_name), NR=NOT_RECORDED, **sections)
