"""The model card (`README.md`) of an exported student: `templates/model_card.md.jinja` under hub metadata
(`huggingface_hub.ModelCardData`), from the run's records: run_summary.json, config.json, this export's facts
(`export`) and evals_downstream.json (`distil_jax.evaluate`). A missing record says "not recorded in this run",
a malformed one makes its section say it could not be rendered, never an exception. The best perplexity is the
lowest (Distily bolds the highest)."""

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


def _redact(d: Any) -> Any:
    """A copy of a nested config with secret-looking keys (`*_token`, `password`, ...) hidden."""
    if isinstance(d, Mapping):
        return {k: "<redacted>" if _SECRET_KEY.search(str(k)) and isinstance(v, str) and v else _redact(v)
                for k, v in d.items()}
    return [_redact(v) for v in d] if isinstance(d, (list, tuple)) else d


def _records(x: Any, *header: str, config: bool = False) -> Optional[str]:
    """A table of a nested record (resources, dataset), "—" for a value not set; of the run's `config`: every
    value, secrets hidden, text as is and the rest as JSON. None for no rows."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(_redact(x), keep_empty_nodes=True, sep=".") if isinstance(x, Mapping) else {}
    rows = [(k, {} if v is traverse_util.empty_node else v) for k, v in flat.items()]
    rows = [(k, (v if isinstance(v, str) and v else json.dumps(v, default=str)) if config
             else "—" if v is None else _cell(v, k)) for k, v in rows]
    return _table(rows, header or ["", "value (—: not measured or not set)"]) if rows else None


def _versions(v: Any) -> str:
    """"package version, ..." with distil_jax first; "" when none are recorded."""
    items = sorted(v.items(), key=lambda kv: kv[0] != "distil_jax") if isinstance(v, Mapping) else []
    return ", ".join(f"{k} {x}" for k, x in items)


def teacher_of(summary: Mapping, config: Mapping) -> Optional[str]:
    """The teacher's hub id or folder, as the run recorded it."""
    return _get(summary, "teacher", "name_or_path") or _get(config, "teacher", "model_name_or_path")


def _card_data(r) -> str:
    """The hub metadata (YAML): a transformers text-generation model whose base is the teacher; a license only
    where the run's config (`license`) or the teacher's own card states one; the model-index: the student's
    figures measured on this export's weights only (the end-of-run perplexities when it is the last step, the
    downstream tasks when they ran on an export of this step)."""
    from huggingface_hub import EvalResult, ModelCardData

    from distil_jax.hf import is_hub_id, license_of

    step, results = _num(_get(r.export, "step")), []

    def add(value, name, dataset, **kw):  # a finite figure; the dataset named by its hub id where it has one
        if (v := _num(value)) is not None and math.isfinite(v):
            hub = is_hub_id(dataset) and dataset not in _LOCAL_BUILDERS
            results.append(EvalResult(task_type="text-generation", dataset_type=dataset if hub else name,
                                      dataset_name=name, metric_value=v, **kw))

    ev = _get(r.summary, "evaluation") if step is not None and step == _num(_get(r.summary, "steps")) else None
    for name, entry in ev.items() if isinstance(ev, Mapping) else ():
        add(_get(entry, "student_end", "ppl"), name, _get(r.config, "eval", "evaluators", name, "uri") or
            (_get(r.config, "dataset", "uri") if name == "heldout" else None), metric_type="perplexity",
            dataset_split="held-out test split" if name == "heldout" else None,
            metric_name="perplexity (token-weighted)")
    same = step is not None and _num(_get(r.downstream, "student", "step")) == step
    rows = _get(r.downstream, "rows") if same else None
    for row in rows if isinstance(rows, list) else ():
        if _get(row, "task") and _get(row, "metric"):
            shots = _get(row, "num_fewshot")
            add(_get(row, "student"), row["task"], _get(row, "dataset"), metric_type=row["metric"],
                metric_name=None if shots is None else f"{row['metric']} ({shots}-shot)",
                source_name="lm-evaluation-harness", source_url="https://github.com/EleutherAI/lm-evaluation-harness")
    uri = _get(r.summary, "dataset", "uri") or _get(r.config, "dataset", "uri")
    kind = _get(r.s_hf, "model_type")
    return ModelCardData(
        base_model=r.teacher if is_hub_id(r.teacher) else None, library_name="transformers",
        datasets=[uri] if is_hub_id(uri) else None, pipeline_tag="text-generation",
        tags=["distillation", "distil_jax", str(kind or "gpt2")],
        model_name=(r.name or "distil_jax student") if results else None, eval_results=results or None,
        **(license_of(_get(r.config, "license")) or license_of(_get(r.export, "teacher_license")))).to_yaml()


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
    return _table(rows + [("size of the weights (this export)", "", _cell(_get(r.export, "weight_bytes"), "_bytes"),
                           "")], ["", "teacher", "student", "student / teacher"])


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
    """The perplexity tables (the run's figure and Distily's), what each evaluator measured, the downstream table."""
    from distil_jax.evaluate import markdown

    ev = _get(r.summary, "evaluation")
    names = [n for n, e in ev.items() if isinstance(e, Mapping)] if isinstance(ev, Mapping) else []
    step = next((s for n in names if (s := _get(ev[n], "student_end", "step")) is not None), _get(r.summary, "steps"))
    who = _get(r.summary, "teacher", "name_or_path")
    rows = [("teacher", f"teacher ({who})" if who else "teacher"),
            ("student_start", "student, before training (step 0)"),
            ("student_end", "student, end of training" + ("" if step is None else f" (step {_cell(_num(step))})"))]
    rows = [(k, label) for k, label in rows if any(isinstance(_get(ev[n], k), Mapping) for n in names)]
    measured = []
    for n in names:  # the source, and the documents and tokens every model was scored on
        spec = _get(r.config, "eval", "evaluators", n)
        source = ", ".join(f"`{spec[k]}`" for k in ("uri", "subset", "split") if _get(spec, k)) or (
            "the run's held-out test split (never trained on)" if n == "heldout" else "source " + NOT_RECORDED)
        d, t = next(((_get(v, "documents"), _get(v, "tokens")) for v in ev[n].values() if _get(v, "tokens")), (0, 0))
        measured.append(f"`{n}`: {source}; " + (f"{_cell(_num(d))} documents, {_cell(_num(t))} predicted tokens"
                                                 if t else "counts " + NOT_RECORDED))
    distily = any(_num(_get(ev[n], k, "distily_ppl")) is not None for n in names for k, _ in rows)
    down = _get(r.downstream, "rows")
    return dict(measured=measured, ppl=rows and _ppl_table(ev, names, rows, "ppl"),
                distily=distily and _ppl_table(ev, names, rows, "distily_ppl"),
                downstream=isinstance(down, list) and markdown([x for x in down if isinstance(x, Mapping)]))


def model_card(summary: Mapping | None, config: Mapping | None, *, export: Mapping | None = None,
               downstream: Mapping | None = None, model_name: str | None = None) -> str:
    """The card's markdown (YAML front matter + sections), from the run's records (see the module docstring;
    {} or None for a missing one). `model_name`: the hub repo id or folder name, for the title and the snippet."""
    import jinja2
    from huggingface_hub import ModelCardData

    summary, config, export, downstream = (d if isinstance(d, Mapping) else {}
                                           for d in (summary, config, export, downstream))
    r = SimpleNamespace(summary=summary, config=config, export=export, downstream=downstream, name=model_name,
                        s_hf=_get(summary, "student", "config") or _get(export, "student_config"),
                        s_params=_get(summary, "student", "params", default=_get(export, "params")),
                        teacher=teacher_of(summary, config), objective=_objective(_get(config, "objective")))
    # The template renders the summary and the record tables; these three build the rest, and one that raises
    # (a malformed record) says so instead. The metadata then is the least a hub card needs.
    sections = {"card_data": ModelCardData(library_name="transformers", tags=["distillation", "distil_jax"]).to_yaml()}
    for name, fn in (("card_data", _card_data), ("arch", _architecture), ("ev", _evaluation)):
        try:
            sections[name] = fn(r)
        except Exception as e:
            log.warning("model card section %s: %s: %s", name, type(e).__name__, e)
            sections.setdefault(name, {"error": f"This section could not be rendered from the run's records "
                                                f"({type(e).__name__})."})
    env = jinja2.Environment(loader=jinja2.PackageLoader("distil_jax", "templates"), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.ChainableUndefined)
    env.filters.update(num=_num, cell=_cell, records=_records, versions=_versions)
    return env.get_template("model_card.md.jinja").render(r=r, model_name=model_name, name_repr=repr(model_name),
                                                          NR=NOT_RECORDED, **sections)
