#!/usr/bin/env python
"""Training throughput of distil_jax's jitted step against a PyTorch baseline that trains the way
Distily does (`tools/torch_baseline.py`), in one invocation, same machine, same shapes, random
weights (nothing is downloaded).

    python tools/bench_throughput.py --teacher gpt2-config --student-layers 6 --batch 4 \\
        --seq-len 256 --steps 6 --warmup-steps 2 --layout padded --json bench.json

`--teacher-cache-k K` adds a third side, distil_jax training from a top-K teacher cache (the
teacher's recorded top-K log-probabilities plus the rest's mass and, with
`--teacher-cache-tail M` (default 8, the library's), M tail samples; docs/teacher_cache.md), and
compares it with distil_jax's online step on the same logits-only objective (KL on the logits,
`--objective logits`, implied): the default sides become `jax,jax_cache`. The cache side's targets
are synthetic (K distinct random ids with sorted log-probabilities per position, as the cache
stores them: uint16 ids, float16 log-probs), made on the host before timing, so its process
never builds the teacher: its memory is what training from a cache needs.

Each side runs in its own subprocess (so that peak RSS / device memory do not mix) and reports:
median step time with min / max over timing windows, tokens/s over all positions and over real
(non-padding) tokens, compile and warm-up time, peak memory (device memory on a GPU: jax
`memory_stats()["peak_bytes_in_use"]` / `torch.cuda.max_memory_allocated`; peak RSS on a CPU),
model FLOPs per token, MFU against a stated peak, and the ratios distil_jax / baseline.

GEMM rates: after its timed steps each side also measures the float32 GEMM rate its framework
reaches on this machine (`--gemm-size`^3 matmuls, median of `--gemm-reps`; XLA for distil_jax,
torch's BLAS for the baseline), and the table gives each side's model FLOP/s (on real tokens
and on all positions) as a share of both rates. On a CPU the two BLAS libraries can differ by
2x, and a throughput ratio should be read against that. `--gemm-size 0` skips it.

Timing: after the warm-up steps, `--steps` steps are timed in `--windows` equal windows. Inside a
window there is no host synchronization at all (jax: steps are dispatched back to back and the
window ends with `jax.block_until_ready` on the state and metrics; torch: CPU ops are synchronous,
and on a GPU the window ends with `torch.cuda.synchronize()`; the loss is never read inside a
window, unless `--host-sync` asks for it to measure what a per-step host read costs). The per-step time of a window is its wall time / its steps; the table shows the median
over windows and their min / max.

Layouts (`--layout`):
  padded  one document per row, right-padded with EOS; `--pad-fraction` (default 0.24, like the
          reference run) of all positions are padding. Both sides compute on every position;
          distil_jax masks padding out of its losses, the baseline (like Distily) averages over it.
  packed  full rows; distil_jax gets segment_ids with several documents per row (attention and
          positions stay inside a document), the baseline gets the same rows as plain sequences.
`--baseline-layout` gives the baseline another layout than distil_jax's: `--layout packed
--baseline-layout padded` compares distil_jax packed against Distily's padded rows (Distily
cannot pack), each on its own batch; the ratio of real tokens/s is then the speed-up on a corpus.

Model FLOPs per token (all positions; the same count for both sides, since both compute the same
model math; rematerialization is not counted, as usual for MFU). With D = width, V = vocabulary,
S = sequence length, H = heads, L_s / L_t = student / teacher blocks, P = mapped attention pairs:

    student (forward + backward = 3 x forward):
        6 * N * L_s                 block matmuls (N per block: GPT-2 qkv 3D^2, out D^2, MLP 8D^2,
                                    N = 12 D^2; Llama q, o D^2 each, k, v D * kv width, SwiGLU
                                    3 D * mlp width; see `block_params`)
      + 12 * L_s * S * D            attention scores QK^T and P.V (2 * 2 * S * D per layer, x3)
      + 6 * D * V                   LM head
    teacher (forward only):
        2 * N * L_t + 4 * L_t * S * D + 2 * D * V
    objective:
      + 6 * H * S^2 * P             orthogonal projection of the mapped [H, S] attention rows by an
                                    S x S matrix, forward + backward
    (embedding lookups, LayerNorms, softmaxes, the KL itself, the S x S matrix exponential and the
    optimizer are not counted; attention is counted over the full S x S square, not the causal
    half.)

Each side also samples the float32 GEMM rate of its own framework (n^3, `--gemm-size`) before
every timed window and after the last; its model FLOP/s is reported as a share of their median.
A shared CPU drifts by tens of percent within minutes: `--rounds R` alternates the sides R
times and pools their windows, so the drift falls on both.

MFU = FLOPs/token * tokens/s (all positions) / peak. Peak (`--peak-tflops`): default 989 TFLOP/s
on a GPU (H100/H200 SXM dense bf16); on a CPU no default ("n/a"): a VM reports only its base clock
(from which a nominal figure came out below the f32 GEMM rate XLA actually reaches), so pass
`--peak-tflops` with a stated figure, e.g. a measured f32 GEMM rate (docs/benchmarks.md does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The teacher shapes (HF config fields; random init). gpt2-config = GPT-2 small (the reference
# run's teacher); smollm2-135m-config = HuggingFaceTB/SmolLM2-135M (a Llama: grouped-query
# attention 9/3 heads, SwiGLU, tied embeddings), the Llama-family counterpart of the same size.
TEACHERS = {
    "gpt2-config": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257,
                        n_positions=1024),
    "tiny": dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256),
    "smollm2-135m-config": dict(model_type="llama", num_hidden_layers=30, hidden_size=576,
                                intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                                vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                                rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-tiny": dict(model_type="llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                       max_position_embeddings=256, tie_word_embeddings=False),
}


def shape(teacher: str) -> dict:
    """A teacher's sizes under generic names (GPT-2 and Llama spell them differently):
    layers, width, heads, kv_heads, mlp (MLP width), vocab, positions, glu (gated MLP)."""
    t = TEACHERS[teacher]
    if t["model_type"] == "gpt2":
        return dict(layers=t["n_layer"], width=t["n_embd"], heads=t["n_head"], kv_heads=t["n_head"],
                    mlp=4 * t["n_embd"], vocab=t["vocab_size"], positions=t["n_positions"], glu=False)
    return dict(layers=t["num_hidden_layers"], width=t["hidden_size"], heads=t["num_attention_heads"],
                kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
                mlp=t["intermediate_size"], vocab=t["vocab_size"],
                positions=t["max_position_embeddings"], glu=True)

# The reference run's objective (configs/base.py): KL on logits + 5 x raw_mse on the layer -2
# attention maps, orthogonal projector on the student side, trainable LayerNorm on the teacher's.
REFERENCE_OBJECTIVE = dict(
    logits=dict(weight=1.0, loss_fn="kl"),
    attn=dict(weight=5.0, loss_fn="raw_mse", layer_mapper="layer-2",
              norm="layernorm_teacher_only_affine", projector="orthogonal"),
)
ATTN_LAYER_K = 2  # layer-2
# The logits-only objective of the teacher-cache comparison (what a cache can feed).
LOGITS_OBJECTIVE = dict(logits=dict(weight=1.0, loss_fn="kl"))
OBJECTIVES = {"reference": REFERENCE_OBJECTIVE, "logits": LOGITS_OBJECTIVE}

GPU_PEAK_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16


@dataclasses.dataclass
class BenchConfig:
    teacher: str = "tiny"
    student_layers: Optional[int] = None  # default: 6 for gpt2-config, 2 for tiny
    batch: int = 2
    seq_len: int = 32
    steps: int = 2  # timed steps (all windows together)
    warmup_steps: int = 1
    windows: int = 2
    layout: str = "padded"
    baseline_layout: Optional[str] = None  # the baseline's layout (None: `layout`)
    pad_fraction: float = 0.24
    docs_per_row: float = 4.0  # packed layout: mean documents per row
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on a CPU
    remat: bool = True
    remat_policy: str = "auto"  # distil_jax's train.remat_policy (the baseline's is always HF's full)
    seed: int = 0
    logits_chunk_tokens: Optional[int] = None  # distil_jax only; None = its automatic choice
    jax_dropout: bool = False  # distil_jax only; StepConfig.dropout (its default: off)
    logits_buckets: int = 8  # distil_jax only; train.logits_buckets (0: LM heads on every position)
    attention: str = "xla"  # distil_jax only; train.attention ("xla" or "cudnn")
    jax_profile: Optional[str] = None  # distil_jax only: trace 2 extra steps into this folder
    torch_dropout: bool = True  # baseline only; False zeroes the student's dropout (investigation)
    host_sync: bool = False  # read the loss on the host after every timed step (a lever measurement)
    peak_tflops: Optional[float] = None
    gemm_size: int = 2048  # n of the n^3 f32 GEMM each side times; 0: skip
    gemm_reps: int = 10
    # Rounds of the sides, alternated (jax, torch, jax, torch, ...): each side's windows of every
    # round pooled, so a drift of the machine's speed during the run falls on both sides.
    rounds: int = 1
    objective: str = "reference"  # "reference" (KL + attention maps) or "logits" (KL only)
    teacher_cache_k: int = 0  # > 0: the jax_cache side trains from a top-k teacher cache
    teacher_cache_tail: int = 8  # its tail samples per position (the library's default)

    def resolved(self) -> "BenchConfig":
        c = dataclasses.replace(self)
        if c.teacher not in TEACHERS:
            raise ValueError(f"unknown --teacher {c.teacher!r}; valid: {', '.join(TEACHERS)}")
        if c.student_layers is None:
            c.student_layers = max(ATTN_LAYER_K, shape(c.teacher)["layers"] // 2)
        if c.student_layers < ATTN_LAYER_K:
            raise ValueError(f"--student-layers must be >= {ATTN_LAYER_K} (the layer-2 attention mapper)")
        if c.seq_len > shape(c.teacher)["positions"]:
            raise ValueError(f"--seq-len {c.seq_len} > the teacher's {shape(c.teacher)['positions']} positions")
        if c.layout not in ("padded", "packed"):
            raise ValueError(f"unknown --layout {c.layout!r}; valid: padded, packed")
        if c.baseline_layout is None:
            c.baseline_layout = c.layout
        if c.baseline_layout not in ("padded", "packed"):
            raise ValueError(f"unknown --baseline-layout {c.baseline_layout!r}; valid: padded, packed")
        if not 0.0 <= c.pad_fraction < 1.0:
            raise ValueError("--pad-fraction must be in [0, 1)")
        if c.steps < 1:
            raise ValueError("--steps must be >= 1")
        c.windows = max(1, min(c.windows, c.steps))
        if c.teacher_cache_k < 0:
            raise ValueError("--teacher-cache-k must be >= 0")
        if c.teacher_cache_k:
            c.objective = "logits"  # a cache holds no attention maps: both sides logits-only
            c.teacher_cache_k = min(c.teacher_cache_k, shape(c.teacher)["vocab"])
        if c.objective not in OBJECTIVES:
            raise ValueError(f"unknown --objective {c.objective!r}; valid: {', '.join(OBJECTIVES)}")
        return c


# ----------------------------------------------------------------------------- shared pieces


def make_batch(cfg: BenchConfig) -> dict:
    """The one batch both sides train on (numpy int32 arrays, [B, S]).

    input_ids; attention_mask (1 = real token, the baseline's input); segment_ids (distil_jax's
    input: 0 = padding, 1.. = document within the row); real_tokens (int).
    padded: row lengths uniform in [S(1 - 2p), S] (p = pad fraction), then adjusted so that the
    batch holds exactly round(B S (1 - p)) real tokens; the rest is EOS padding.
    packed: every position is real; documents of random length (mean S / docs_per_row).
    """
    import numpy as np

    B, S = cfg.batch, cfg.seq_len
    V = shape(cfg.teacher)["vocab"]
    eos = V - 1
    rng = np.random.RandomState(cfg.seed + 1234)
    ids = rng.randint(0, V - 1, (B, S)).astype(np.int32)
    seg = np.zeros((B, S), np.int32)
    if cfg.layout == "padded":
        p = cfg.pad_fraction
        lo = max(1, int(round(S * max(0.0, 1.0 - 2.0 * p))))
        lengths = rng.randint(lo, S + 1, B)
        target = max(B, int(round(B * S * (1.0 - p))))
        # Nudge row lengths (within [1, S]) until the total is exactly the target.
        i = 0
        while lengths.sum() != target:
            r = i % B
            if lengths.sum() < target and lengths[r] < S:
                lengths[r] += 1
            elif lengths.sum() > target and lengths[r] > 1:
                lengths[r] -= 1
            i += 1
        for r, n in enumerate(lengths):
            seg[r, :n] = 1
            ids[r, n:] = eos
    else:
        mean = max(1.0, S / cfg.docs_per_row)
        for r in range(B):
            pos, doc = 0, 1
            while pos < S:
                n = int(np.clip(rng.exponential(mean), 1, S - pos))
                seg[r, pos:pos + n] = doc
                ids[r, pos + n - 1] = eos  # documents end with EOS, as the data layer packs them
                pos, doc = pos + n, doc + 1
    mask = (seg > 0).astype(np.int32)
    return dict(input_ids=ids, attention_mask=mask, segment_ids=seg, real_tokens=int(mask.sum()))


def block_params(t: dict) -> int:
    """Matmul weights of one block: q and out projections D^2 each, k and v D * (kv_heads * D /
    heads) each, MLP 2 * D * mlp (3 * D * mlp when gated, as Llama's SwiGLU). 12 D^2 for GPT-2."""
    D = t["width"]
    kv = D * t["kv_heads"] // t["heads"]
    return 2 * D * D + 2 * D * kv + (3 if t["glu"] else 2) * D * t["mlp"]


def flops_per_token(cfg: BenchConfig, teacher_forward: bool = True) -> dict:
    """Model FLOPs per token position (see the module docstring for the formula). The
    logits-only objective maps no attention (P = 0); from a teacher cache
    (teacher_forward=False) no teacher FLOPs are spent."""
    t = shape(cfg.teacher)
    D, V, H, Lt = t["width"], t["vocab"], t["heads"], t["layers"]
    Ls, S, P = cfg.student_layers, cfg.seq_len, 1 if cfg.objective == "reference" else 0
    N = block_params(t)
    student = 6 * N * Ls + 12 * Ls * S * D + 6 * D * V
    teacher = 2 * N * Lt + 4 * Lt * S * D + 2 * D * V if teacher_forward else 0
    objective = 6 * H * S * S * P
    return dict(student=student, teacher=teacher, objective=objective, total=student + teacher + objective)


CPU_PEAK_NOTE = ("n/a: no stated CPU peak (a VM hides the boost clock; pass --peak-tflops, e.g. a "
                 "measured f32 GEMM rate)")


def _peak(cfg: BenchConfig, on_gpu: bool) -> tuple[Optional[float], str]:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops, "--peak-tflops"
    if on_gpu:
        return GPU_PEAK_TFLOPS, "H100/H200 dense bf16"
    return None, CPU_PEAK_NOTE


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _load_avg() -> Optional[list]:
    """The 1/5/15-minute load averages (a shared CPU makes timings noisy: recorded with them)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def gemm_sampler_jax(n: int) -> Optional[Callable[[], float]]:
    """A function timing one float32 n x n x n matmul in XLA (full float32 precision, compiled
    and warmed up here) -> TFLOP/s; None if n == 0."""
    if n <= 0:
        return None
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    mm(a, b).block_until_ready()

    def sample() -> float:
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        return 2 * n ** 3 / (time.perf_counter() - t0) / 1e12

    return sample


def gemm_sampler_torch(n: int) -> Optional[Callable[[], float]]:
    """As `gemm_sampler_jax`, with torch's BLAS (cuBLAS without TF32 on a GPU, torch's default)."""
    if n <= 0:
        return None
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    torch.mm(a, b)
    sync()

    def sample() -> float:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        return 2 * n ** 3 / (time.perf_counter() - t0) / 1e12

    return sample


def _median_or_none(xs: list) -> Optional[float]:
    return statistics.median(xs) if xs else None


def timed_windows(cfg: BenchConfig, run_steps: Callable[[int], None],
                  gemm: Optional[Callable[[], float]]) -> tuple[list, list, float]:
    """(seconds per step of each timed window, GEMM TFLOP/s samples, the process's minor page
    faults per timed step: memory the step touches fresh every time, as when an allocator maps
    its temporaries anew; docs/benchmarks.md's huge-pages lever). A shared CPU's speed
    drifts by tens of percent within minutes, so the GEMM rate is sampled right before every
    window and `gemm_reps` times after the last, and a share of it is read against their
    median, not against one reading taken at another moment. The sample before a window is the
    best of 3 calls: the first GEMM after a train step runs at as little as a third of the rate
    (seen on a 2-core CPU), which would bias the median low."""
    window_times, samples, faults = [], [], 0
    for n in _window_sizes(cfg):
        if gemm is not None:
            samples.append(max(gemm() for _ in range(3)))
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        run_steps(n)
        window_times.append((time.perf_counter() - t0) / n)
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    if gemm is not None:
        samples += [gemm() for _ in range(max(1, cfg.gemm_reps))]
    return window_times, samples, faults / sum(_window_sizes(cfg))


def _summarize(cfg: BenchConfig, batch: dict, window_times: list, extra: dict, on_gpu: bool,
               teacher_forward: bool = True) -> dict:
    med = statistics.median(window_times)
    B, S = cfg.batch, cfg.seq_len
    fpt = flops_per_token(cfg, teacher_forward)
    peak, peak_src = _peak(cfg, on_gpu)
    tps = B * S / med
    mfu = fpt["total"] * tps / (peak * 1e12) if peak else None
    out = dict(
        step_time_s_median=med,
        step_time_s_min=min(window_times),
        step_time_s_max=max(window_times),
        step_time_s_windows=window_times,
        tokens_per_s=tps,
        real_tokens_per_s=batch["real_tokens"] / med,
        real_tokens_per_step=batch["real_tokens"],
        tokens_per_step=B * S,
        flops_per_token=fpt["total"],
        flops_per_token_parts=fpt,
        achieved_tflops=fpt["total"] * tps / 1e12,
        real_token_tflops=fpt["total"] * batch["real_tokens"] / med / 1e12,
        peak_tflops=peak,
        peak_source=peak_src,
        mfu=mfu,
        cpu_count=os.cpu_count(),
        load_avg_end=_load_avg(),
        # The process's malloc settings: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 changes the faults.
        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
    )
    out.update(extra)
    return out


# ----------------------------------------------------------------------------- distil_jax


def cache_targets(cfg: BenchConfig, host: dict) -> dict:
    """Synthetic teacher-cache targets for the batch, in the stored dtypes: per position k
    distinct random ids (uint16 / int32), descending float16 log-probabilities of a random
    distribution with 80 % of its mass on them, float32 log of the rest's mass (the step's cost
    does not depend on the values)."""
    import numpy as np

    from distil_jax import teacher_cache as tcache
    from distil_jax.objectives.objective import CACHE_BATCH_KEYS, CACHE_TAIL_KEYS

    B, S, k = cfg.batch, cfg.seq_len, cfg.teacher_cache_k
    V = shape(cfg.teacher)["vocab"]
    rng = np.random.default_rng(cfg.seed + 99)
    ids = np.stack([rng.choice(V, k, replace=False) for _ in range(B * S)]).reshape(B, S, k)
    # A peaked teacher, like a trained LM: its top k hold 80 % of the mass, the rest 20 %.
    logits = rng.standard_normal((B, S, k)) * 3
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True)) + np.log(0.8)
    top = -np.sort(-logp, axis=-1)
    rest = np.full((B, S), np.log(0.2))
    real = host["segment_ids"] > 0
    out = (np.where(real[..., None], ids, 0).astype(tcache.ids_dtype(V)),
           np.where(real[..., None], top, 0).astype(np.float16),
           np.where(real, rest, 0).astype(np.float32))
    targets = dict(zip(CACHE_BATCH_KEYS, out))
    m = cfg.teacher_cache_tail
    if m:
        # Tail draws: any ids (the step's cost does not depend on which), float16 log-probs.
        tail = rng.integers(0, V, (B, S, m))
        tail_lp = np.log(0.2 / (V - k)) + rng.standard_normal((B, S, m))
        targets.update(zip(CACHE_TAIL_KEYS, (np.where(real[..., None], tail, 0).astype(tcache.ids_dtype(V)),
                                             np.where(real[..., None], tail_lp, 0).astype(np.float16))))
    return targets


def run_jax_cache(cfg: BenchConfig) -> dict:
    """distil_jax's step training from a top-k teacher cache (no teacher in the process)."""
    return run_jax(cfg, cached=True)


def run_jax(cfg: BenchConfig, cached: bool = False) -> dict:
    """Time distil_jax's jitted train step (the library's own step, mesh and placement);
    cached: from a teacher cache (StepConfig.teacher_cache_k), no teacher forward."""
    cfg = cfg.resolved()
    import jax
    import jax.numpy as jnp

    from distil_jax import models, sharding
    from distil_jax.training import builders as train_lib
    from distil_jax import train_step as ts

    load_start = _load_avg()
    on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    dtype = jnp.dtype(dtype_name)
    t_setup = time.perf_counter()

    eos = shape(cfg.teacher)["vocab"] - 1
    tc = models.config_from_hf(dict(TEACHERS[cfg.teacher], bos_token_id=eos, eos_token_id=eos))
    k_t, k_s, k_o, k_r = jax.random.split(jax.random.PRNGKey(cfg.seed), 4)
    # From a cache the teacher is never built (the student's LM head is initialized randomly
    # instead of copied: the same shapes and trainable set, so the same step cost).
    teacher_params = None if cached else jax.jit(lambda k: models.init_params(tc, k))(k_t)
    # The run's own builders (distil_jax.train), so the benchmark times what a run trains.
    sconf, sparams, strainable = train_lib.build_student(
        {"overrides": {"num_hidden_layers": cfg.student_layers},
         "copy_teacher_modules": [] if cached else [("lm_head", False)],
         "dropout": cfg.jax_dropout}, tc, teacher_params, k_s, cfg.seq_len)
    obj = train_lib.build_objective(dict(OBJECTIVES[cfg.objective], logits_chunk_tokens=cfg.logits_chunk_tokens),
                                    sconf, tc)
    params, tmask = train_lib.trained_params(obj, sparams, strainable, k_o, sconf, tc, cfg.seq_len)
    total_steps = cfg.warmup_steps + cfg.steps
    # The reference config's optimizer: Adam(W) 2e-4 for the student, Distily's second group
    # (lr 1e-3, weight decay 0.01, unclipped) for the objective's parameters.
    tx, sched = ts.make_optimizer(dict(optimizer="adamw", learning_rate=2e-4, adam_beta1=0.9, adam_beta2=0.999,
                                       adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                                       warmup_steps=0, objective_learning_rate=1e-3,
                                       objective_weight_decay=0.01, objective_clip=False),
                                  total_steps, tmask)
    # The frozen teacher is kept in the compute dtype (it is never trained); the student keeps
    # float32 master weights and computes in `dtype`.
    teacher_params = jax.tree_util.tree_map(lambda x: x.astype(dtype), teacher_params)
    sc = ts.StepConfig(tc, sconf, obj, dtype=dtype, remat=cfg.remat_policy if cfg.remat else False,
                       dropout=cfg.jax_dropout,
                       attention_impl=cfg.attention, single_document_rows=cfg.layout == "padded",
                       teacher_cache_k=cfg.teacher_cache_k if cached else 0)
    models.check_attention_impl(sc.attention_impl, dtype)

    # The run's placement (distil_jax.sharding) on a data-parallel mesh over every device.
    state = ts.create_train_state(params, tx, k_r)
    placement = sharding.make_placement(
        sharding.make_mesh(), state, sconf, tc,
        models.param_shapes(tc) if teacher_params is None else teacher_params)
    state = placement.put_state(state)
    if cached:  # the step gets no teacher argument
        placement = dataclasses.replace(placement, teacher=None)
    else:
        teacher_params = placement.put_teacher(teacher_params)
    del params, sparams
    host = make_batch(cfg)
    # The library's padding-aware step: the batch's logits bucket picks the compiled variant.
    bucketed = ts.BucketedTrainStep(sc, tx, sched, buckets=cfg.logits_buckets, placement=placement,
                                    trainable=tmask)
    logits_capacity = bucketed.capacity(host)
    step_batch = {"input_ids": host["input_ids"], "segment_ids": host["segment_ids"]}
    if cached:
        step_batch.update(cache_targets(cfg, host))
    step, batch = bucketed.step_for(step_batch)
    jax.block_until_ready((state, teacher_params, batch))
    setup_s = time.perf_counter() - t_setup
    rss_setup = _rss_bytes()

    t0 = time.perf_counter()
    compiled = step.lower(state, teacher_params, batch).compile()
    compile_s = time.perf_counter() - t0

    first_loss = None
    t0 = time.perf_counter()
    for i in range(cfg.warmup_steps):
        state, metrics = compiled(state, teacher_params, batch)
        if i == 0:
            first_loss = float(metrics["loss"])  # outside the timed windows
    jax.block_until_ready(state)
    warmup_s = time.perf_counter() - t0

    def run_steps(n: int) -> None:
        nonlocal state, metrics
        for _ in range(n):
            state, metrics = compiled(state, teacher_params, batch)
            if cfg.host_sync:
                float(metrics["loss"])  # only with --host-sync: what a log-every-step loop does
        jax.block_until_ready((state, metrics))  # the only sync of the window

    metrics = None
    window_times, gemm_samples, faults = timed_windows(cfg, run_steps, gemm_sampler_jax(cfg.gemm_size))
    last_loss = float(metrics["loss"])
    profile = None
    if cfg.jax_profile:  # after the timed windows, so the trace costs them nothing
        try:
            profile = str(profile_steps(lambda s: compiled(s, teacher_params, batch)[0], state, cfg.jax_profile))
        except Exception as e:  # a profiler that cannot start (no CUPTI, ...) must not lose the timings
            profile = f"failed: {type(e).__name__}: {e}"
            print(f"warning: --jax-profile {profile}", file=sys.stderr)

    dev = jax.devices()[0]
    # The settings the library decided for this batch shape (as BucketedTrainStep did).
    resolved = ts.for_batch_shape(dataclasses.replace(sc, logits_groups=placement.batch_shards), cfg.batch,
                                  cfg.seq_len)
    stats = dev.memory_stats() if on_gpu else None
    if stats and "peak_bytes_in_use" in stats:
        peak_mem, mem_kind = int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    else:
        peak_mem, mem_kind = _rss_bytes(), "peak RSS of the process"
    extra = dict(
        side="jax_cache" if cached else "jax", device=f"{dev.platform}:{getattr(dev, 'device_kind', '')}", dtype=dtype_name,
        remat=cfg.remat, layout=cfg.layout, setup_s=setup_s, compile_s=compile_s, warmup_s=warmup_s,
        peak_memory_bytes=peak_mem, peak_memory_kind=mem_kind, rss_after_setup_bytes=rss_setup,
        loss_first=first_loss, loss_last=last_loss, load_avg_start=load_start,
        student_dropout=cfg.jax_dropout, attention=cfg.attention, profile=profile, logits_buckets=cfg.logits_buckets, logits_capacity=logits_capacity,
        logits_chunk_tokens=resolved.logits_chunk, remat_policy=resolved.remat,
        versions=dict(jax=jax.__version__), gemm_f32_tflops=_median_or_none(gemm_samples), gemm_f32_tflops_samples=gemm_samples,
        gemm_source="XLA", minor_faults_per_step=faults,
        objective=cfg.objective, teacher_cache_k=cfg.teacher_cache_k if cached else 0,
    )
    return _summarize(cfg, host, window_times, extra, on_gpu, teacher_forward=not cached)


def profile_steps(step, state, folder: str, steps: int = 2, top: int = 40) -> Path:
    """Trace `steps` calls of `state = step(state)` with jax.profiler into `folder` (a Perfetto
    trace, `*.trace.json.gz`, for ui.perfetto.dev) and write `folder/top_ops.txt`: the events with
    the most total time (device kernels on a GPU, XLA thunks on a CPU), so the trace can be read
    without a viewer. Returns the path of top_ops.txt."""
    import gzip

    import jax

    folder = Path(folder)
    jax.profiler.start_trace(str(folder), create_perfetto_trace=True)
    try:
        for _ in range(steps):
            state = step(state)
        jax.block_until_ready(state)
    finally:
        jax.profiler.stop_trace()
    traces = sorted(folder.glob("**/*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    if not traces:
        raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {folder}")
    events = json.load(gzip.open(traces[-1]))["traceEvents"]
    processes = {e["pid"]: e["args"].get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    total, count = {}, {}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        key = (processes.get(e.get("pid"), str(e.get("pid"))), e["name"])
        total[key] = total.get(key, 0.0) + e["dur"]
        count[key] = count.get(key, 0) + 1
    lines = [f"jax.profiler trace of {steps} steps: {traces[-1].name}",
             f"{'total ms':>10} {'calls':>6}  process | event"]
    for key in sorted(total, key=total.get, reverse=True)[:top]:
        lines.append(f"{total[key] / 1e3:>10.1f} {count[key]:>6}  {key[0][:40]} | {key[1][:120]}")
    out = folder / "top_ops.txt"
    out.write_text("\n".join(lines) + "\n")
    return out


def _window_sizes(cfg: BenchConfig) -> list[int]:
    base, rem = divmod(cfg.steps, cfg.windows)
    return [base + (1 if i < rem else 0) for i in range(cfg.windows)]


# ----------------------------------------------------------------------------- PyTorch baseline


def run_torch(cfg: BenchConfig) -> dict:
    """Time the Distily-equivalent PyTorch step (tools/torch_baseline.py) on its own layout
    (`baseline_layout`)."""
    cfg = cfg.resolved()
    cfg = dataclasses.replace(cfg, layout=cfg.baseline_layout)
    import torch
    import transformers

    from tools import torch_baseline as tb

    load_start = _load_avg()
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    dtype = getattr(torch, dtype_name)
    t_setup = time.perf_counter()
    teacher_cfg = tb.hf_config(**TEACHERS[cfg.teacher])
    teacher, student, objective = tb.build(teacher_cfg, cfg.student_layers, cfg.seq_len, device=device,
                                           dtype=dtype, remat=cfg.remat, seed=cfg.seed,
                                           dropout=cfg.torch_dropout)
    trainer = tb.Trainer(teacher, student, objective, total_steps=cfg.warmup_steps + cfg.steps)
    host = make_batch(cfg)
    ids = torch.as_tensor(host["input_ids"], dtype=torch.long, device=device)
    # Distily's collator always passes an attention mask (all ones for full rows).
    am = torch.as_tensor(host["attention_mask"], dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    sync()
    setup_s = time.perf_counter() - t_setup
    rss_setup = _rss_bytes()

    first_loss = None
    t0 = time.perf_counter()
    for i in range(cfg.warmup_steps):
        loss = trainer.step(ids, am)
        if i == 0:
            first_loss = float(loss)
    sync()
    warmup_s = time.perf_counter() - t0

    def run_steps(n: int) -> None:
        nonlocal loss
        for _ in range(n):
            loss = trainer.step(ids, am)
            if cfg.host_sync:
                float(loss)
        sync()

    window_times, gemm_samples, faults = timed_windows(cfg, run_steps, gemm_sampler_torch(cfg.gemm_size))
    last_loss = float(loss)

    if on_gpu:
        peak_mem, mem_kind = int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
        dev = f"cuda:{torch.cuda.get_device_name()}"
    else:
        peak_mem, mem_kind = _rss_bytes(), "peak RSS of the process"
        dev = "cpu"
    extra = dict(
        side="torch", device=dev, dtype=dtype_name, remat=cfg.remat, layout=cfg.layout, setup_s=setup_s,
        compile_s=0.0, warmup_s=warmup_s, peak_memory_bytes=peak_mem, peak_memory_kind=mem_kind,
        rss_after_setup_bytes=rss_setup, loss_first=first_loss, loss_last=last_loss,
        load_avg_start=load_start, student_dropout=cfg.torch_dropout, torch_threads=torch.get_num_threads(),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
        gemm_f32_tflops=_median_or_none(gemm_samples), gemm_f32_tflops_samples=gemm_samples,
        gemm_source="torch", minor_faults_per_step=faults,
    )
    return _summarize(cfg, host, window_times, extra, on_gpu)


RUNNERS = {"jax": run_jax, "torch": run_torch, "jax_cache": run_jax_cache}


# ----------------------------------------------------------------------------- orchestration


def run_side_subprocess(cfg: BenchConfig, side: str, timeout: Optional[float] = None) -> dict:
    """Run one side in a fresh Python process (its own peak RSS / device memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{side}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-config",
               json.dumps(dataclasses.asdict(dataclasses.replace(cfg, rounds=1))), "--sides", side,
               "--json", str(out)]  # one round per process: the parent alternates them
        proc = subprocess.run(cmd, cwd=str(REPO), timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"the {side} benchmark process failed (exit code {proc.returncode})")
        return json.loads(out.read_text())[side]


def pool_rounds(runs: list[dict]) -> dict:
    """One side's result over several rounds: the first round's, with the step times of every
    round's windows and every GEMM sample pooled (medians over the pool), each rate rescaled to
    the pooled median step, the largest peak memory and the mean page faults per step."""
    out = dict(runs[0])
    if len(runs) == 1:
        return out
    windows = [t for r in runs for t in r["step_time_s_windows"]]
    med = statistics.median(windows)
    scale = out["step_time_s_median"] / med
    for key in ("tokens_per_s", "real_tokens_per_s", "achieved_tflops", "real_token_tflops", "mfu"):
        if out.get(key) is not None:
            out[key] = out[key] * scale
    samples = [g for r in runs for g in (r.get("gemm_f32_tflops_samples") or [])]
    out.update(step_time_s_median=med, step_time_s_min=min(windows), step_time_s_max=max(windows),
               step_time_s_windows=windows, rounds=len(runs),
               step_time_s_round_medians=[r["step_time_s_median"] for r in runs],
               gemm_f32_tflops=_median_or_none(samples), gemm_f32_tflops_samples=samples,
               peak_memory_bytes=max(r["peak_memory_bytes"] for r in runs),
               load_avg_end=runs[-1].get("load_avg_end"))
    faults = [r["minor_faults_per_step"] for r in runs if r.get("minor_faults_per_step") is not None]
    if faults:
        out["minor_faults_per_step"] = statistics.mean(faults)
    return out


def bench(cfg: BenchConfig, sides=("jax", "torch"), isolate: bool = True) -> dict:
    """Both sides (each in its own process unless isolate=False) -> the JSON result."""
    cfg = cfg.resolved()
    result = {"config": dataclasses.asdict(cfg)}
    for side in sides:
        if side not in RUNNERS:
            raise ValueError(f"unknown side {side!r}; valid: {', '.join(RUNNERS)}")
        if side == "torch" and cfg.objective != "reference":
            raise ValueError("the torch baseline runs the reference objective only; drop torch from "
                             "--sides or use --objective reference without --teacher-cache-k")
        if side == "jax_cache" and not cfg.teacher_cache_k:
            raise ValueError("side jax_cache needs --teacher-cache-k K")
    runs = {side: [] for side in sides}
    for _ in range(max(1, cfg.rounds)):
        for side in sides:
            runs[side].append(run_side_subprocess(cfg, side) if isolate else RUNNERS[side](cfg))
    for side in sides:
        result[side] = pool_rounds(runs[side])
    if "jax" in result and "torch" in result:
        j, t = result["jax"], result["torch"]
        result["ratio_real_tokens_per_s"] = j["real_tokens_per_s"] / t["real_tokens_per_s"]
        result["ratio_tokens_per_s"] = j["tokens_per_s"] / t["tokens_per_s"]
        result["ratio_peak_memory"] = j["peak_memory_bytes"] / t["peak_memory_bytes"]
    # Each side's model FLOP/s as a share of each framework's f32 GEMM rate on this machine.
    gemm = {name: result[side].get("gemm_f32_tflops") for side, name in (("jax", "xla"), ("torch", "torch"))
            if side in result}
    result["gemm_f32_tflops"] = gemm
    for side in sides:
        r = result[side]
        r["gemm_share"] = {name: (dict(real_tokens=r["real_token_tflops"] / rate, all_positions=r["achieved_tflops"] / rate)
                                  if rate else None) for name, rate in gemm.items()}
    if "jax" in result and "jax_cache" in result:
        j, c = result["jax"], result["jax_cache"]
        result["ratio_cache_real_tokens_per_s"] = c["real_tokens_per_s"] / j["real_tokens_per_s"]
        result["ratio_cache_peak_memory"] = c["peak_memory_bytes"] / j["peak_memory_bytes"]
    return result


def _share(r: dict, name: str) -> str:
    share = (r.get("gemm_share") or {}).get(name)
    if not share:
        return "-"
    return f"{100 * share['real_tokens']:.0f}% / {100 * share['all_positions']:.0f}%"


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _remat_text(result: dict, c: dict) -> str:
    """distil_jax's remat policy as asked, and what "auto" resolved to on the jax side."""
    asked = c.get("remat_policy", "full")
    got = (result.get("jax") or result.get("jax_cache") or {}).get("remat_policy")
    return f"{asked} -> {got}" if asked == "auto" and got else asked


def format_table(result: dict) -> str:
    c = result["config"]
    sides = [s for s in ("jax", "jax_cache", "torch") if s in result]
    layouts = {c["layout"]} | {c.get("baseline_layout") or c["layout"]}
    layout_text = (c["layout"] if len(layouts) == 1 else
                   f"distil_jax {c['layout']}, baseline {c['baseline_layout']}")
    head = (f"teacher {c['teacher']} -> student {c['student_layers']} layers | batch {c['batch']} x seq "
            f"{c['seq_len']} | layout {layout_text}"
            + (f" (pad {c['pad_fraction']:.2f})" if "padded" in layouts else "")
            + f" | {c.get('objective', 'reference')} objective | remat "
            + (f"on (distil_jax: {_remat_text(result, c)})" if c["remat"] else "off")
            + f" | {c['steps']} timed steps in {c['windows']} windows"
            + (f", {c['rounds']} rounds alternated" if c.get("rounds", 1) > 1 else ""))
    rows = [
        ("device", lambda r: r["device"]),
        ("dtype", lambda r: r["dtype"]),
        ("attention / LM-head tokens", lambda r: (f"{r['attention']} / {r['logits_capacity'] or 'every position'}"
                                                  if r["side"] != "torch" else "eager, all maps / every position")),
        ("step time median (s)", lambda r: f"{r['step_time_s_median']:.4f}"),
        ("step time min..max (s)", lambda r: f"{r['step_time_s_min']:.4f}..{r['step_time_s_max']:.4f}"),
        ("tokens/s (all positions)", lambda r: f"{r['tokens_per_s']:,.0f}"),
        ("tokens/s (real tokens)", lambda r: f"{r['real_tokens_per_s']:,.0f}"),
        ("compile (s)", lambda r: f"{r['compile_s']:.1f}"),
        ("warm-up steps (s)", lambda r: f"{r['warmup_s']:.1f}"),
        ("peak memory", lambda r: f"{_fmt_bytes(r['peak_memory_bytes'])} ({r['peak_memory_kind']})"),
        ("model GFLOP/token", lambda r: f"{r['flops_per_token'] / 1e9:.3f}"),
        ("layout", lambda r: r["layout"]),
        ("achieved TFLOP/s", lambda r: f"{r['achieved_tflops']:.3f}"),
        ("model TFLOP/s on real tokens", lambda r: f"{r['real_token_tflops']:.3f}"),
        ("f32 GEMM TFLOP/s (own framework)",
         lambda r: "-" if r.get("gemm_f32_tflops") is None else f"{r['gemm_f32_tflops']:.3f} ({r['gemm_source']})"),
        ("share of XLA GEMM, real / all", lambda r: _share(r, "xla")),
        ("share of torch GEMM, real / all", lambda r: _share(r, "torch")),
        ("MFU", lambda r: "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.2f}% of {r['peak_tflops']:.3g} TFLOP/s"),
        ("peak FLOP/s basis", lambda r: r["peak_source"]),
        ("load avg start / end", lambda r: f"{r['load_avg_start']} / {r['load_avg_end']}"),
        ("minor page faults per step", lambda r: f"{r['minor_faults_per_step']:,.0f}"
         if r.get("minor_faults_per_step") is not None else "-"),
        ("loss first / last", lambda r: f"{r['loss_first'] if r['loss_first'] is None else round(r['loss_first'], 4)} / {r['loss_last']:.4f}"),
    ]
    width = max(len(k) for k, _ in rows)
    names = {"jax": "distil_jax", "torch": "torch baseline (Distily)",
             "jax_cache": f"distil_jax, top-{c.get('teacher_cache_k')} cache"
                          + (f" + {c['teacher_cache_tail']} tail" if c.get("teacher_cache_tail") else "")}
    cells = {k: [f(result[s]) for s in sides] for k, f in rows}
    col = [max([len(names[s])] + [len(cells[k][i]) for k, _ in rows]) for i, s in enumerate(sides)]
    lines = [head, f"{'':<{width}}  " + " | ".join(f"{names[s]:<{col[i]}}" for i, s in enumerate(sides))]
    for k, _ in rows:
        lines.append(f"{k:<{width}}  " + " | ".join(f"{c:<{col[i]}}" for i, c in enumerate(cells[k])))
    if "ratio_cache_real_tokens_per_s" in result:
        lines.append(f"ratio cache / online ({c['objective']} objective): real tokens/s "
                     f"{result['ratio_cache_real_tokens_per_s']:.2f}x, peak memory "
                     f"{result['ratio_cache_peak_memory']:.2f}x")
    if "ratio_real_tokens_per_s" in result:
        lines.append(f"ratio distil_jax / baseline: real tokens/s {result['ratio_real_tokens_per_s']:.2f}x, "
                     f"all-position tokens/s {result['ratio_tokens_per_s']:.2f}x, peak memory "
                     f"{result['ratio_peak_memory']:.2f}x")
    gemm = result.get("gemm_f32_tflops") or {}
    if gemm.get("xla") and gemm.get("torch"):
        lines.append(f"f32 GEMM on this machine ({c.get('gemm_size')}^3): XLA {gemm['xla']:.3f} TFLOP/s, torch "
                     f"{gemm['torch']:.3f} TFLOP/s (XLA / torch {gemm['xla'] / gemm['torch']:.2f}x)")
    return "\n".join(lines)


def parse_args(argv=None) -> tuple[BenchConfig, list, Optional[str], bool]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="gpt2-config", choices=sorted(TEACHERS))
    p.add_argument("--student-layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps (all windows)")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--windows", type=int, default=3, help="timing windows (median / min / max over them)")
    p.add_argument("--sides", default=None, help="comma-separated, of jax, torch, jax_cache "
                   "(default jax,torch; jax,jax_cache with --teacher-cache-k)")
    p.add_argument("--objective", default="reference", choices=sorted(OBJECTIVES),
                   help="distil_jax's objective: reference (KL + layer -2 attention maps) or logits "
                        "(KL only; implied by --teacher-cache-k)")
    p.add_argument("--teacher-cache-tail", type=int, default=8, metavar="M",
                   help="the cache side's tail samples per position (teacher.cache_tail_samples; "
                        "default 8, the library's)")
    p.add_argument("--teacher-cache-k", type=int, default=0, metavar="K",
                   help="also time distil_jax training from a top-K teacher cache (side jax_cache) "
                        "against its online step, both with the logits-only objective")
    p.add_argument("--layout", default="padded", choices=["padded", "packed"])
    p.add_argument("--baseline-layout", default=None, choices=["padded", "packed"],
                   help="the baseline's layout (default: --layout); e.g. --layout packed "
                        "--baseline-layout padded: distil_jax packed against Distily's padded rows")
    p.add_argument("--gemm-size", type=int, default=2048,
                   help="each side also times an n^3 float32 GEMM in its framework (0: skip)")
    p.add_argument("--gemm-reps", type=int, default=10,
                   help="GEMM samples after the last window (one more, the best of 3 calls, before each window)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the sides alternately this many times and pool their windows, so that "
                        "the machine's drift falls on both sides (each round compiles and warms up again)")
    p.add_argument("--pad-fraction", type=float, default=0.24)
    p.add_argument("--docs-per-row", type=float, default=4.0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing on both sides (the reference run: on)")
    p.add_argument("--remat-policy", default="auto", choices=["auto", "full", "dots"],
                   help="distil_jax's train.remat_policy: full (recompute each block, as HF), dots "
                        "(keep the weight matmuls' outputs) or auto (the library's default: dots when "
                        "they fit in a tenth of the device's memory)")
    p.add_argument("--logits-chunk-tokens", type=int, default=None,
                   help="distil_jax's objective.logits_chunk_tokens (default: automatic; 0: never chunk)")
    p.add_argument("--jax-dropout", action="store_true", help="distil_jax StepConfig.dropout (default off)")
    p.add_argument("--attention", default="xla", choices=["xla", "cudnn"],
                   help="distil_jax's train.attention for the layers whose maps no loss reads "
                        "(cudnn: NVIDIA GPU, bfloat16)")
    p.add_argument("--jax-profile", default=None, metavar="DIR",
                   help="after timing, trace 2 distil_jax steps with jax.profiler into DIR (Perfetto trace "
                        "and DIR/top_ops.txt, the events with the most time)")
    p.add_argument("--logits-buckets", type=int, default=8,
                   help="distil_jax's train.logits_buckets: LM heads and logits losses on the real tokens "
                        "rounded up to 1/N of the batch (default 8, the library's; 0: every position)")
    p.add_argument("--no-torch-dropout", action="store_true",
                   help="baseline student without dropout (Distily trains with it; for comparisons only)")
    p.add_argument("--host-sync", action="store_true",
                   help="read the loss on the host after every timed step (default: never inside a window)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-isolate", action="store_true", help="run both sides in this process")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.sides is None:
        a.sides = "jax,jax_cache" if a.teacher_cache_k else "jax,torch"
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    if a.child_config:
        cfg = BenchConfig(**json.loads(a.child_config))
    else:
        cfg = BenchConfig(teacher=a.teacher, student_layers=a.student_layers, batch=a.batch, seq_len=a.seq_len,
                          steps=a.steps, warmup_steps=a.warmup_steps, windows=a.windows, layout=a.layout,
                          baseline_layout=a.baseline_layout, gemm_size=a.gemm_size, gemm_reps=a.gemm_reps, rounds=a.rounds,
                          pad_fraction=a.pad_fraction, docs_per_row=a.docs_per_row, dtype=a.dtype,
                          remat=a.remat, remat_policy=a.remat_policy, seed=a.seed, logits_chunk_tokens=a.logits_chunk_tokens,
                          jax_dropout=a.jax_dropout, attention=a.attention,
                          jax_profile=str(Path(a.jax_profile).resolve()) if a.jax_profile else None,
                          logits_buckets=a.logits_buckets, torch_dropout=not a.no_torch_dropout,
                          host_sync=a.host_sync, peak_tflops=a.peak_tflops, objective=a.objective,
                          teacher_cache_k=a.teacher_cache_k, teacher_cache_tail=a.teacher_cache_tail)
    return cfg, sides, a.json, bool(a.child_config) or a.no_isolate


def main(argv=None) -> int:
    cfg, sides, json_path, in_process = parse_args(argv)
    result = bench(cfg, sides, isolate=not in_process and len(sides) > 0)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    if not cfg_is_child(argv):
        print(format_table(result), flush=True)
    return 0


def cfg_is_child(argv) -> bool:
    return "--child-config" in (argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
