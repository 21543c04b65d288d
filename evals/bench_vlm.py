"""Prefill and decode speed of a LLaVA-1.5-shaped model on CPU, with tokred's projector- and
llm-stage reducers, against the unreduced model and against an "oracle" in the same process.

Run ``python evals/bench_vlm.py [--rounds 3] [--threads 2] [--batch 1] [--json out.json]`` (about
20-40 minutes on 2 threads; ``--tiny`` runs a toy model in seconds). The model is built in code
with seeded random weights (speed does not depend on them): a CLIP ViT-L/14-336-shaped tower (24
layers, dim 1024, 576 patches + class token, feature layer -2), LLaVA's two-layer GELU projector
and a Qwen2-0.5B-shaped language model (24 layers, dim 896, 14 heads / 2 KV heads, SwiGLU 4864)
with LLaVA-1.5's 32064-token vocabulary and an untied head (0.42B parameters), float32, SDPA.
The prompt has LLaVA-1.5's chat layout: 35 system/user tokens, the 576 image placeholders, 25
question tokens. Every configuration runs once per round in a rotating order (plus an uncounted
warm-up round); times are medians over rounds and every ratio is against the unreduced model's
median in the same rounds. Columns: *kept* = visual tokens that reach the language model (for
llm-stage reducers: the layers from K on); *TTFT s* = time to first token, one
``model(..., use_cache=True, logits_to_keep=1)`` prefill; *TTFT ratio* = TTFT / unreduced TTFT;
*prefill GFLOPs* = tokred's analytic count (tower + projector + language model prefill, reducer
included); *FLOPs ratio* = the same over the unreduced count; *speedup ÷ predicted* = measured
speedup / FLOPs-predicted speedup (= FLOPs ratio / TTFT ratio); *vs oracle bound* = TTFT / the
fastest this reducer could be: the oracle's TTFT (the unpatched tower + projector, then the
unpatched language model + head on a sequence of text + kept tokens) at the same kept count, plus
for llm-stage reducers K/L of the measured language-model time difference between the full and the
reduced sequence (the K layers that must run at full length); *selection %* = the reducer's own
selection (``plan_images`` / ``keep_mask``, and the adapter's attention row for FastV) timed inside
the run, as a share of the row's TTFT; *decode tok/s ratio* = decode tokens/s over the unreduced
model's (greedy, ``--decode-steps`` steps after the prefill); *peak MB* = peak process RSS during
the prefill minus the RSS just before it (sampled every 2 ms in a separate pass after the timing
rounds, with glibc's malloc set to return freed memory); *KV MB* = bytes of the key and value
cache after the prefill. Oracle rows have no decode or selection (—).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import tokred
from tokred.decoder import LanguageModelEngine

# model shapes ------------------------------------------------------------------------------------------

FULL = dict(
    tower=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=336, patch_size=14),
    text=dict(vocab_size=32064, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096),
    image_token=32000, pad_token=32001, before=35, after=25, ks=(64, 128, 192), rounds=3, decode_steps=8,
)
TINY = dict(
    tower=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=56, patch_size=14),
    text=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    image_token=998, pad_token=999, before=35, after=25, ks=(4, 8), rounds=1, decode_steps=2,
)
LLM_LAYER = 2  # K for DART and FastV


def build_model(shape: dict, seed: int = 0):
    """LlavaForConditionalGeneration with seeded random weights, eval mode, float32, SDPA."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    text = Qwen2Config(**shape["text"], pad_token_id=shape["pad_token"], tie_word_embeddings=False)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**shape["tower"]), text_config=text,
                         image_token_id=shape["image_token"], vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=False)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval().float()


def num_patches(model) -> int:
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def build_inputs(model, shape: dict, batch: int, seed: int = 0) -> dict:
    """LLaVA-1.5 chat layout: ``before`` text ids, the image placeholders, ``after`` text ids;
    random ids below the image token (never the image token), one random image per sample."""
    generator = torch.Generator().manual_seed(seed)
    high = min(shape["image_token"], model.config.text_config.vocab_size)
    n = num_patches(model)
    rows = []
    for _ in range(batch):
        before = torch.randint(3, high, (shape["before"],), generator=generator)
        after = torch.randint(3, high, (shape["after"],), generator=generator)
        rows.append(torch.cat([before, torch.full((n,), shape["image_token"]), after]))
    input_ids = torch.stack(rows)
    size = model.config.vision_config.image_size
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                pixel_values=torch.randn(batch, 3, size, size, generator=generator))


# configurations ----------------------------------------------------------------------------------------

@dataclass
class Spec:
    """One row: no reduction, a reducer, or the oracle on ``oracle`` visual tokens."""

    key: str
    label: str
    stage: str
    target: int  # the kept count the row is grouped under
    reducer: tokred.reducers.base.Reducer | None = None
    oracle: int | None = None


def pool_stride(grid: tuple[int, int], k: int) -> tuple[int, int]:
    """The (rows, cols) pooling window, dividing the grid (no partial windows) and at most 4 a side, whose
    output count is closest to k; ties go to square windows."""
    rows, cols = grid
    options = [(a, b) for a in range(1, 5) for b in range(1, 5) if rows % a == 0 and cols % b == 0]
    return min(options, key=lambda s: (abs(pool_count(grid, s) - k), abs(s[0] - s[1]), s))


def pool_count(grid: tuple[int, int], stride: tuple[int, int]) -> int:
    return math.ceil(grid[0] / stride[0]) * math.ceil(grid[1] / stride[1])


def make_specs(ks: tuple[int, ...], grid: tuple[int, int]) -> list[Spec]:
    n = grid[0] * grid[1]
    specs = [Spec("none", "none", "—", n),
             Spec(f"oracle-{n}", "oracle (unpatched, full length)", "oracle", n, oracle=n)]
    oracles = {n}
    pools = set()
    for k in ks:
        group = []
        stride = pool_stride(grid, k)
        count = pool_count(grid, stride)
        for c in sorted({k, count}):
            if c not in oracles:
                oracles.add(c)
                group.append(Spec(f"oracle-{c}", "oracle", "oracle", k, oracle=c))
        group.append(Spec(f"divprune-{k}", "DivPrune", "projector", k, tokred.DivPrune(keep=k)))
        group.append(Spec(f"random-{k}", "Random", "projector", k, tokred.Random(keep=k / n, stage="projector")))
        if stride not in pools:
            pools.add(stride)
            group.append(Spec(f"pool-{stride[0]}x{stride[1]}", f"Pool {stride[0]}x{stride[1]}", "projector", k,
                              tokred.Pool(stride=stride[0] if stride[0] == stride[1] else stride, stage="projector")))
        group.append(Spec(f"dart-{k}", f"DART K={LLM_LAYER}", "llm", k, tokred.DART(keep=k, layer=LLM_LAYER)))
        group.append(Spec(f"fastv-{k}", f"FastV K={LLM_LAYER}", "llm", k, tokred.FastV(keep=k, layer=LLM_LAYER)))
        specs += group
    return specs


# selection timing --------------------------------------------------------------------------------------

class Stopwatch:
    """Seconds spent in the reducer's own selection during the current run."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


SELECTION = Stopwatch()
_TIMED_CLASSES: dict[type, type] = {}


def timed_reducer(reducer):
    """A copy of ``reducer`` whose selection method (``plan_images`` or ``keep_mask``) adds to SELECTION."""
    base = type(reducer)
    if base not in _TIMED_CLASSES:
        method = "keep_mask" if reducer.stage == "llm" else "plan_images"
        original = getattr(base, method)

        def selection(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                SELECTION.seconds += time.perf_counter() - start

        _TIMED_CLASSES[base] = type(base.__name__, (base,), {method: selection, "__module__": __name__})
    return _TIMED_CLASSES[base](**{f.name: getattr(reducer, f.name) for f in dataclasses.fields(reducer)})


def configure(model, spec: Spec) -> None:
    """Patch the model for ``spec`` (unpatched for the none and oracle rows)."""
    if spec.reducer is None:
        tokred.remove(model)
        return
    tokred.apply(model, timed_reducer(spec.reducer))


# FastV's attention row, computed by the language-model engine, is part of its selection time
LanguageModelEngine.last_attention = SELECTION.wrap(LanguageModelEngine.last_attention)


# one run -----------------------------------------------------------------------------------------------

def prefill(model, inputs: dict):
    start = time.perf_counter()
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start, out


def next_token(logits, image_token: int):
    logits = logits[:, -1].clone()
    logits[:, image_token] = -torch.inf  # a generated image placeholder would mean something else
    return logits.argmax(dim=-1, keepdim=True)


def decode(model, inputs: dict, out, steps: int, image_token: int) -> float:
    """Seconds for ``steps`` greedy decode steps after the prefill ``out``."""
    cache, mask = out.past_key_values, inputs["attention_mask"]
    token = next_token(out.logits, image_token)
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = next_token(step.logits, image_token)
    return time.perf_counter() - start


def oracle(model, inputs: dict, count: int, image_token: int):
    """The unpatched model on a sequence of the reduced length: tower + projector on the full image,
    then the language model + head on text + ``count`` visual tokens. Returns (seconds, language
    model seconds, cache)."""
    base, config = model.model, model.config
    ids = inputs["input_ids"]
    image = (ids[0] == image_token).nonzero().squeeze(1)
    first, last = int(image[0]), int(image[-1])
    start = time.perf_counter()
    features = base.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True,
                                       vision_feature_layer=config.vision_feature_layer,
                                       vision_feature_select_strategy=config.vision_feature_select_strategy
                                       ).pooler_output
    if not torch.is_tensor(features):
        features = torch.stack(list(features))
    embed = base.get_input_embeddings()
    embeds = torch.cat([embed(ids[:, :first]), features[:, :count].to(embed.weight.dtype), embed(ids[:, last + 1:])],
                       dim=1)
    middle = time.perf_counter()
    out = base.language_model(inputs_embeds=embeds, use_cache=True)
    model.lm_head(out.last_hidden_state[:, -1:])
    end = time.perf_counter()
    return end - start, end - middle, out.past_key_values


def kv_megabytes(cache) -> float:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers) / 2 ** 20


# memory ------------------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRss:
    """Peak RSS (sampled every ``interval`` s in a thread) minus the RSS on entry, in ``.megabytes``."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval

    def __enter__(self):
        self.before = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.megabytes = (self.peak - self.before) / 2 ** 20


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory(libc, first: bool) -> None:
    """Make RSS follow live memory: large blocks from mmap (returned on free), free heap trimmed."""
    if libc is None:
        return
    if first:
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also stops glibc raising it on its own)
    gc.collect()
    libc.malloc_trim(0)


# the benchmark -----------------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def iqr(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]] if values else [float("nan")] * 2
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return [low, high]


@dataclass
class Measured:
    ttft: list[float] = field(default_factory=list)
    lm: list[float] = field(default_factory=list)  # oracle: language model + head alone
    selection: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    flops: dict | None = None
    kept: int | None = None
    kv_mb: float | None = None
    peak_mb: float | None = None

    def add(self, run: dict) -> None:
        for name in ("ttft", "lm", "selection", "decode"):
            if name in run:
                getattr(self, name).append(run[name])


def prefill_flops(model) -> dict:
    """FLOPs of the last forward by stage, ``prefill`` (their total) and ``decode_per_token``."""
    report = tokred.flops(model)
    return dict(report.stages, prefill=report.total, decode_per_token=report.decode_per_token)


def run_once(model, inputs: dict, spec: Spec, shape: dict, decode_steps: int, details: bool) -> dict:
    """One run of ``spec``: times, and with ``details`` the kept count, FLOPs and KV size."""
    image_token = shape["image_token"]
    n = num_patches(model)
    configure(model, spec)
    SELECTION.seconds = 0.0
    if spec.oracle is not None:
        seconds, lm_seconds, cache = oracle(model, inputs, spec.oracle, image_token)
        run = dict(ttft=seconds, lm=lm_seconds)
        if details:
            run.update(kept=spec.oracle, kv_mb=kv_megabytes(cache))
        return run
    seconds, out = prefill(model, inputs)
    run = dict(ttft=seconds, selection=SELECTION.seconds)
    if details:
        run["kv_mb"] = kv_megabytes(out.past_key_values)
        if spec.reducer is not None:
            run["flops"] = prefill_flops(model)
            run["kept"] = tokred.last_trace(model).final_tokens - (inputs["input_ids"].shape[1] - n)
    if decode_steps:
        run["decode"] = decode(model, inputs, out, decode_steps, image_token)
    return run


def oracle_flops(model, inputs: dict, count: int) -> dict:
    """The oracle computes what a projector-stage Random keeping ``count`` tokens computes (Random
    has no FLOPs of its own): tokred's count of that run."""
    n = num_patches(model)
    if count == n:
        tokred.remove(model)
        report = tokred.flops(model, **inputs, use_cache=True, logits_to_keep=1)
        return dict(report.stages, prefill=report.total, decode_per_token=report.decode_per_token)
    reducer = tokred.Random(keep=count / n, stage="projector")
    assert reducer.kept(n) == count, (count, n)
    tokred.apply(model, reducer)
    model(**inputs, use_cache=True, logits_to_keep=1)
    flops = prefill_flops(model)
    tokred.remove(model)
    return flops


def benchmark(args) -> dict:
    shape = TINY if args.tiny else FULL
    rounds = args.rounds if args.rounds is not None else shape["rounds"]
    decode_steps = args.decode_steps if args.decode_steps is not None else shape["decode_steps"]
    ks = tuple(args.ks) if args.ks else shape["ks"]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = build_model(shape, args.seed)
    inputs = build_inputs(model, shape, args.batch, args.seed)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    n = side * side
    specs = make_specs(ks, (side, side))
    measured = {spec.key: Measured() for spec in specs}
    libc = _libc()
    progress = tqdm(total=len(specs) * (rounds + 3), desc="bench_vlm", disable=args.no_progress)
    with torch.inference_mode():
        for spec in specs:  # FLOPs of the unreduced model and of the oracles: untimed runs
            progress.set_postfix_str(f"FLOPs {spec.key}")
            if spec.reducer is None:
                measured[spec.key].flops = oracle_flops(model, inputs, spec.oracle or n)
                measured[spec.key].kept = spec.oracle or n
            progress.update()
        names = [spec.key for spec in specs]
        by_key = {spec.key: spec for spec in specs}
        for round_index in range(rounds + 1):  # round 0: uncounted warm-up; kept counts, FLOPs, KV size
            shift = round_index % len(names)
            for key in names[shift:] + names[:shift]:
                progress.set_postfix_str(f"round {round_index}/{rounds} {key}")
                run = run_once(model, inputs, by_key[key], shape, decode_steps, details=round_index == 0)
                m = measured[key]
                if round_index == 0:
                    m.kv_mb = run["kv_mb"]
                    m.kept = run.get("kept", m.kept)
                    m.flops = run.get("flops", m.flops)
                else:
                    m.add(run)
                progress.update()
        for i, spec in enumerate(specs):  # memory pass, after the timing rounds
            progress.set_postfix_str(f"memory {spec.key}")
            configure(model, spec)
            release_freed_memory(libc, i == 0)
            with PeakRss() as peak:
                if spec.oracle is not None:
                    result = oracle(model, inputs, spec.oracle, shape["image_token"])
                else:
                    result = prefill(model, inputs)
            del result
            measured[spec.key].peak_mb = peak.megabytes if libc is not None else None
            progress.update()
        tokred.remove(model)
    progress.close()
    rows = summarise(specs, measured, model.config.text_config.num_hidden_layers, decode_steps, args.batch)
    tower = sum(p.numel() for p in model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    language = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    import transformers
    return dict(rows=rows, tiny=args.tiny, rounds=rounds, decode_steps=decode_steps, batch=args.batch,
                threads=torch.get_num_threads(), ks=list(ks), llm_layer=LLM_LAYER,
                prompt=dict(before=shape["before"], image=n, after=shape["after"],
                            total=int(inputs["input_ids"].shape[1])),
                parameters=dict(tower=tower, projector=projector, language_model=language),
                shapes=dict(tower=shape["tower"], text=shape["text"]), seconds=time.perf_counter() - started,
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                cpu_count=os.cpu_count())


def summarise(specs: list[Spec], measured: dict[str, Measured], num_layers: int, decode_steps: int,
              batch: int) -> list[dict]:
    none = measured["none"]
    full_ttft, full_flops = median(none.ttft), none.flops["prefill"]
    full_decode = median(none.decode) if decode_steps else None
    n = none.kept
    full_lm = median(measured[f"oracle-{n}"].lm)
    rows = []
    for spec in specs:
        m = measured[spec.key]
        ttft = median(m.ttft)
        row = dict(key=spec.key, reducer=spec.label, stage=spec.stage, target=spec.target, kept=m.kept,
                   config=repr(spec.reducer) if spec.reducer is not None else None,
                   ttft_s=ttft, ttft_s_rounds=m.ttft, ttft_ratio=ttft / full_ttft,
                   ttft_ratio_iqr=iqr([t / f for t, f in zip(m.ttft, none.ttft)]),
                   flops=m.flops, prefill_gflops=m.flops["prefill"] / 1e9,
                   flops_ratio=m.flops["prefill"] / full_flops)
        row["predicted_speedup"] = full_flops / m.flops["prefill"]
        row["measured_speedup"] = full_ttft / ttft
        row["of_predicted"] = row["measured_speedup"] / row["predicted_speedup"]
        reference = measured.get(f"oracle-{m.kept}")
        if reference is not None and reference.ttft:
            bound = median(reference.ttft)
            if spec.stage == "llm":  # layers 0..K-1 run at full length
                bound += spec.reducer.layer / num_layers * (full_lm - median(reference.lm))
            row["oracle_bound_s"] = bound
            row["vs_oracle_bound"] = ttft / bound
        if spec.oracle is not None:
            row["lm_s"] = median(m.lm)
            row["lm_s_rounds"] = m.lm
        else:
            row["selection_s"] = median(m.selection)
            row["selection_s_rounds"] = m.selection
            row["selection_share"] = row["selection_s"] / ttft
            if decode_steps:
                row["decode_s_rounds"] = m.decode
                row["decode_tokens_per_s"] = decode_steps * batch / median(m.decode)
                row["decode_ratio"] = full_decode / median(m.decode)
        row["kv_mb"], row["peak_mb"] = m.kv_mb, m.peak_mb
        rows.append(row)
    return rows


# output ------------------------------------------------------------------------------------------------

def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _num(value: float) -> str:
    """Two decimals, or three significant digits for small numbers (the tiny model)."""
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def markdown(result: dict) -> str:
    lines = ["| reducer | stage | kept | TTFT s | TTFT ratio (IQR) | prefill GFLOPs | FLOPs ratio "
             "| speedup ÷ predicted | vs oracle bound | selection % | decode tok/s ratio | peak MB | KV MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        low, high = row["ttft_ratio_iqr"]
        selection = row.get("selection_share")
        lines.append(
            f"| {row['reducer']} | {row['stage']} | {row['kept']} | {_num(row['ttft_s'])} | "
            f"{row['ttft_ratio']:.3f} ({low:.2f}-{high:.2f}) | {_num(row['prefill_gflops'])} | "
            f"{row['flops_ratio']:.3f} | "
            f"{row['of_predicted']:.3f} | {_fmt(row.get('vs_oracle_bound'), '.3f')} | "
            f"{_fmt(None if selection is None else 100 * selection, '.2f', '%')} | "
            f"{_fmt(row.get('decode_ratio'), '.3f')} | {_fmt(row['peak_mb'], '.0f')} | {_fmt(row['kv_mb'], '.1f')} |")
    none, full_oracle = result["rows"][0], result["rows"][1]
    params, prompt = result["parameters"], result["prompt"]
    lines.append("")
    lines.append(f"{prompt['total']} prompt tokens ({prompt['before']} + {prompt['image']} image + {prompt['after']}), "
                 f"batch {result['batch']}, {result['threads']} threads, {result['rounds']} rounds + warm-up; "
                 f"parameters: tower {params['tower'] / 1e6:.3g}M, projector {params['projector'] / 1e6:.3g}M, "
                 f"language model {params['language_model'] / 1e6:.3g}M. Full-length oracle: tower + projector "
                 f"{_num(full_oracle['ttft_s'] - full_oracle['lm_s'])} s, language model + head "
                 f"{_num(full_oracle['lm_s'])} s. Unreduced decode {_fmt(none.get('decode_tokens_per_s'), '.2f')} "
                 f"tok/s. Run took {result['seconds'] / 60:.1f} min.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds after the warm-up (default 3; tiny 1)")
    parser.add_argument("--decode-steps", type=int, default=None, help="decode steps timed after each prefill (8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ks", type=int, nargs="+", help="kept visual token counts (default 64 128 192)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a toy model (16 visual tokens) for smoke tests")
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = benchmark(args)
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
