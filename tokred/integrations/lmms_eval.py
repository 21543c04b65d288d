"""The lmms-eval model plugin: ``lmms-eval --model tokred --model_args pretrained=PATH,reducers=SPEC``.

Loads any vision-language checkpoint tokred has an adapter for (``AutoModelForImageTextToText`` +
``AutoProcessor``), applies the reducers of a registry spec (:func:`tokred.parse_spec`: reducers joined by
``+``, parameters by ``/``, no commas, so the spec is one value of ``--model_args``) and answers lmms-eval's
requests (written against lmms-eval 0.7.3; ``tokred[lmms]`` pins ``>=0.7.3,<0.8``):

- ``generate_until``: batches of ``batch_size`` requests with the same task and generation arguments,
  left-padded; greedy unless ``temperature > 0`` or ``do_sample``; the text is cut at the first stop string
  of ``until``.
- ``loglikelihood`` (``loglikelihood`` and ``multiple_choice`` tasks): one request at a time, lmms-eval's
  convention: the mean token **loss** of the continuation (what the built-in ``llava_hf`` returns; lower is
  better) and whether greedy decoding would give it. The continuation is appended to the prompt verbatim
  (``multiple_choice`` tasks bring their own leading space) and ``prompt_length=`` tells tokred's reducers to
  decide on the prompt alone. Each answer is wrapped in a ``GenerationResult``: lmms-eval 0.7.3 turns a bare
  ``(loss, greedy)`` tuple into a string before scoring.

Prompts: images go first, as ``{"type": "image"}`` items of a user message rendered with the processor's
chat template; a checkpoint without one (or ``chat_template=none``) gets the task's text with the
processor's image token in front of it, unless the text already holds one per image.

Cost next to the score: every forward that answers a request records tokred's analytic prefill FLOPs
(:func:`tokred.flops`: vision, projector and language-model prefill) and the visual tokens that reach the
language model's last layer, against the unreduced model on the same inputs (one extra prefill per batch,
skipped when no reducer is set). Per request means the batch's figure divided by its size, which is exact
with ``batch_size=1`` and whenever the batch's samples are alike. After each call the per-task summary
(:data:`COST_METRICS`) goes through lmms-eval's metric log into the results file's ``throughput`` section,
as ``avg_tokred/<task>/<metric>``; :func:`costs` reads it back.

Several processes (``accelerate launch --multi_gpu --num_processes N -m lmms_eval ...``; on a machine without
GPUs too, where ``--cpu`` would start one process): each process puts the model on its own device
(:func:`placement`), lmms-eval gives it its share of the requests, and the cost summary is gathered from
every process before it is logged (lmms-eval pads a short share with copies of a request: they count too);
``processes`` says how many processes answered a task's requests.

Bad ``--model_args`` (an unknown argument, a bad reducer spec, a checkpoint that does not load, reducers the
model does not support) raise :class:`ModelArgsError` while the model is built, before any request: a
``SystemExit``, because lmms-eval's command line catches every ``Exception`` of a run, prints it and exits 0.
"""
from __future__ import annotations

import statistics
import time
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F

import tokred
from tokred.integrations import lmms_eval_costs as costs  # the cost summary of a results dict (read back)

try:
    from lmms_eval.api.instance import GenerationResult, TokenCounts
    from lmms_eval.api.model import lmms
except ImportError as error:  # lmms-eval missing, or one without the 0.7 model interface
    raise ImportError(f"tokred's lmms-eval plugin needs lmms-eval 0.7's model interface ({error}): "
                      "pip install 'tokred[lmms]' (lmms-eval>=0.7.3,<0.8)") from None

#: what the plugin reports per task (``avg_tokred/<task>/<metric>`` in the results' ``throughput``)
COST_METRICS = ("requests", "processes", "prefill_flops_mean", "prefill_flops_std", "prefill_flops_ratio",
                "visual_tokens_mean", "visual_tokens_std", "visual_tokens_full", "visual_tokens_ratio")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
CHAT_TEMPLATES = ("auto", "none")
#: generation arguments of lmms-eval tasks the plugin uses; others are ignored (named in a warning once)
GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "top_p", "num_beams", "do_sample")


class ModelArgsError(SystemExit):
    """Bad ``--model_args`` for the tokred model: a ``SystemExit`` whose code is the message (Python prints it
    and exits with status 1), so that lmms-eval's command line, which catches every ``Exception`` of a run and
    exits 0, fails visibly."""


def _log_metrics():
    """lmms-eval's metric log (``results["throughput"]``), an internal module of lmms-eval 0.7."""
    try:
        from lmms_eval.models.model_utils.gen_metrics import log_metrics
    except ImportError as error:
        from importlib.metadata import version

        raise ImportError(f"tokred's lmms-eval plugin logs its FLOPs through lmms_eval.models.model_utils.gen_metrics."
                          f"log_metrics, which lmms-eval {version('lmms-eval')} does not have ({error}); install "
                          "'tokred[lmms]', which pins lmms-eval>=0.7.3,<0.8") from None
    return log_metrics


def placement(device: str | None, num_processes: int, local_index: int, cuda: bool) -> str:
    """The device this process puts the model on: ``device`` (``auto``/None: ``cuda`` when there is a GPU,
    else ``cpu``); with several processes on GPUs, each process takes the GPU of its local index
    (``cuda:<local_index>``), as ``accelerate launch`` expects; on CPU every process uses ``cpu``."""
    device = str(device) if device is not None else "auto"
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if num_processes > 1 and device.startswith("cuda"):
        return f"cuda:{local_index}"
    return device


def summarise(records: list[dict]) -> dict[str, float]:
    """One task's :data:`COST_METRICS` from its per-request records (``flops``, ``flops_full``, ``visual``,
    ``visual_full``, ``rank``): means and population standard deviations per request; ratios of the sums
    (reduced / unreduced); the number of processes (distinct ranks). No ``prefill_flops_ratio`` when the
    unreduced FLOPs were not measured (``flops_full`` None)."""
    def std(values):
        return statistics.pstdev(values) if len(values) > 1 else 0.0

    flops, visual = [r["flops"] for r in records], [r["visual"] for r in records]
    full_visual = sum(r["visual_full"] for r in records)
    out = {"requests": len(records), "processes": len({r["rank"] for r in records}),
           "prefill_flops_mean": statistics.fmean(flops), "prefill_flops_std": std(flops),
           "visual_tokens_mean": statistics.fmean(visual), "visual_tokens_std": std(visual),
           "visual_tokens_full": full_visual / len(records),
           "visual_tokens_ratio": sum(visual) / full_visual if full_visual else 1.0}
    if all(r["flops_full"] is not None for r in records):
        out["prefill_flops_ratio"] = sum(flops) / sum(r["flops_full"] for r in records)
    return out


class TokredModel(lmms):
    """A Hugging Face vision-language model with tokred's reducers, for lmms-eval (module docstring).

    ``--model_args``: ``pretrained`` (a checkpoint folder or hub id), ``reducers`` (a registry spec, default
    ``none``), ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``...), ``dtype`` (``float32``, ``bfloat16``,
    ``float16``, ``auto``), ``batch_size``, ``max_new_tokens`` (when the task sets none), ``chat_template``
    (``auto``: the processor's, if it has one; ``none``: plain text), ``attn_implementation``,
    ``local_files_only`` and ``measure_full`` (``false``: no unreduced prefill, no ``prefill_flops_ratio``).
    Generation always uses the KV cache, so reducers decide on the prompt alone. ``max_batch_size`` (which
    lmms-eval's command line may pass) is accepted and unused. Bad arguments raise :class:`ModelArgsError`.
    """

    is_simple = True

    def __init__(self, pretrained: str, reducers="none", device: str | None = None, dtype: str = "float32",
                 batch_size=1, max_batch_size=None, max_new_tokens: int = 1024, chat_template: str = "auto",
                 attn_implementation: str | None = None, local_files_only: bool = False,
                 measure_full: bool = True, **unknown):
        super().__init__()
        try:
            self._build(pretrained, reducers, device, dtype, batch_size, max_new_tokens, chat_template,
                        attn_implementation, local_files_only, measure_full, unknown)
        except (ValueError, TypeError, OSError) as error:
            raise ModelArgsError(f"tokred model, bad --model_args: {error}") from error

    def _build(self, pretrained, reducers, device, dtype, batch_size, max_new_tokens, chat_template,
               attn_implementation, local_files_only, measure_full, unknown) -> None:
        """``__init__``'s work; its ValueError / TypeError / OSError become :class:`ModelArgsError`."""
        if unknown:
            raise ValueError(f"unknown --model_args for the tokred model: {', '.join(map(repr, unknown))}. Known: "
                             "pretrained, reducers, device, dtype, batch_size, max_new_tokens, chat_template, "
                             "attn_implementation, local_files_only, measure_full. Several reducers are "
                             "joined by '+' in one value (reducers=divprune:keep=0.25+dart:layer=2/keep=0.5): "
                             "a ',' starts a new argument")
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
        if str(chat_template) not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template={chat_template!r}; expected one of {', '.join(CHAT_TEMPLATES)}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected a positive integer")
        self.reducers = tokred.parse_spec(str(reducers))  # before loading anything: a bad spec fails fast
        from accelerate import Accelerator
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self._device = torch.device(placement(device, self._world_size, self.accelerator.local_process_index,
                                              torch.cuda.is_available()))
        self.model = AutoModelForImageTextToText.from_pretrained(
            str(pretrained), dtype=DTYPES[str(dtype)], attn_implementation=attn_implementation,
            local_files_only=bool(local_files_only)).to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(str(pretrained), local_files_only=bool(local_files_only))
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at the end
        tokred.apply(self.model, *self.reducers)  # no reducer: still traced, so FLOPs are measured
        self.batch_size = int(batch_size)
        self.max_new_tokens, self.measure_full = int(max_new_tokens), bool(measure_full)
        self.plain_prompts = str(chat_template) == "none" or getattr(self.processor, "chat_template", None) is None
        self.image_token = getattr(self.processor, "image_token", None) or "<image>"
        self.records: dict[str, list[dict]] = defaultdict(list)  # per task, one record per request
        self._ignored_keys: set[str] = set()

    @property
    def device(self):
        return self._device

    # prompts and inputs ---------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if any(isinstance(v, str) for v in visuals):
            raise ValueError(f"task {task!r} gives video inputs ({visuals[0]!r}); tokred's lmms-eval plugin "
                             "evaluates image tasks for now")
        return [v.convert("RGB") for v in visuals]

    def prompt(self, context: str, images: int) -> str:
        """The text the processor receives for a task's ``context`` with ``images`` images (module docstring)."""
        if self.plain_prompts:
            if images and context.count(self.image_token) != images:
                context = " ".join([self.image_token] * images) + "\n" + context
            return context
        text = context.replace(self.image_token, "").strip()
        content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def _inputs(self, texts: list[str], images: list) -> dict:
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        return {k: v.to(self._device, self.model.dtype) if v.is_floating_point() else v.to(self._device)
                for k, v in inputs.items()}

    # costs ----------------------------------------------------------------------------------------------
    def _record(self, task: str, inputs: dict, logits_to_keep: int) -> None:
        """Per request of the batch that just ran a prefill on ``inputs``: its FLOPs and visual tokens, and the
        unreduced model's on the same inputs."""
        batch = inputs["input_ids"].shape[0]
        flops, visual = tokred.flops(self.model).total, self._kept_visual(inputs)
        full_visual = int((inputs["input_ids"] == self.model.config.image_token_id).sum())
        full = flops if not self.reducers else None
        if full is None and self.measure_full:
            with tokred.applied(self.model):
                full = tokred.flops(self.model, **inputs, logits_to_keep=logits_to_keep).total
        for _ in range(batch):
            self.records[task].append({"flops": flops / batch, "flops_full": None if full is None else full / batch,
                                       "visual": visual / batch, "visual_full": full_visual / batch,
                                       "rank": self._rank})

    def _kept_visual(self, inputs: dict) -> int:
        """Visual tokens of the last prefill that reach the language model's last layer (the batch's sum)."""
        trace = tokred.last_trace(self.model)
        kept = next(r for r in trace.layers if r.stage == "projector").tokens_out
        llm = [r for r in trace.layers if r.stage == "llm" and r.tokens_per_image is not None]
        if llm:  # an llm-stage plan: every valid token that is left minus the text tokens
            placeholders = int((inputs["input_ids"] == self.model.config.image_token_id).sum())
            text = int(inputs["attention_mask"].sum()) - placeholders
            kept = sum(llm[-1].tokens_per_image) - text
        return kept

    def _log_costs(self, seconds: float, generated: int) -> None:
        """The per-task summary of every request so far into lmms-eval's metric log (all processes' records)."""
        records = dict(self.records)
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * self._world_size
            torch.distributed.all_gather_object(gathered, records)
            records = defaultdict(list)
            for part in gathered:
                for task, rows in part.items():
                    records[task] += rows
        metrics = {f"tokred/{task}/{k}": v for task, rows in records.items() for k, v in summarise(rows).items()}
        rate = generated / seconds if seconds > 0 else 0.0
        _log_metrics()(total_elapsed_time=seconds, total_gen_tokens=generated, avg_speed=rate,
                       additional_metrics=metrics)

    # requests ------------------------------------------------------------------------------------------
    def _generation_kwargs(self, gen_kwargs: dict) -> tuple[list[str], dict]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        ignored = set(kwargs) - set(GENERATION_KEYS) - self._ignored_keys
        if ignored:
            warnings.warn(f"tokred's lmms-eval model ignores the generation arguments {sorted(ignored)}", stacklevel=2)
            self._ignored_keys |= ignored
        temperature = float(kwargs.get("temperature") or 0.0)
        sample = bool(kwargs.get("do_sample", False)) or temperature > 0
        out = dict(max_new_tokens=int(kwargs.get("max_new_tokens") or self.max_new_tokens), do_sample=sample,
                   num_beams=int(kwargs.get("num_beams") or 1), use_cache=True)
        if sample:
            out["temperature"] = temperature if temperature > 0 else 1.0
            if kwargs.get("top_p") is not None:
                out["top_p"] = float(kwargs["top_p"])
        return until, out

    @torch.no_grad()
    def generate_until(self, requests) -> list[GenerationResult]:
        start, generated = time.perf_counter(), 0
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            _, gen_kwargs, _, _, task, split = request.args
            groups[(task, split, repr(sorted(gen_kwargs.items())))].append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        tokenizer = self.processor.tokenizer
        for indices in groups.values():
            for at in range(0, len(indices), self.batch_size):
                chunk = indices[at:at + self.batch_size]
                texts, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    visuals = self._visuals(doc_to_visual, task, split, doc_id)
                    texts.append(self.prompt(context, len(visuals)))
                    images += visuals
                _, gen_kwargs, _, _, task, _ = requests[chunk[0]].args
                until, kwargs = self._generation_kwargs(gen_kwargs)
                inputs = self._inputs(texts, images)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                out = self.model.generate(**inputs, **kwargs, pad_token_id=pad)
                self._record(task, inputs, logits_to_keep=1)
                new = out[:, inputs["input_ids"].shape[1]:]
                texts = tokenizer.batch_decode(new, skip_special_tokens=True)
                for i, row, text, mask in zip(chunk, new, texts, inputs["attention_mask"]):
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    length = int((row != pad).sum())
                    generated += length
                    results[i] = GenerationResult(text, TokenCounts(input_tokens=int(mask.sum()), output_tokens=length))
        self._log_costs(time.perf_counter() - start, generated)
        return results

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[GenerationResult]:
        start, results = time.perf_counter(), []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if callable(continuation):  # output_type loglikelihood passes doc_to_target itself
                continuation = continuation(self.task_dict[task][split][doc_id])
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self.prompt(context, len(visuals))
            prompt_length = self._inputs([prompt], visuals)["input_ids"].shape[1]
            inputs = self._inputs([prompt + str(continuation)], visuals)
            ids = inputs["input_ids"]
            if ids.shape[1] <= prompt_length:
                raise ValueError(f"task {task!r}, doc {doc_id}: the continuation {continuation!r} adds no token "
                                 "to the prompt")
            logits = self.model(**inputs, prompt_length=prompt_length).logits
            self._record(task, inputs, logits_to_keep=0)
            # counted from the end: reducers remove visual tokens only, so the last rows are the continuation's
            length = ids.shape[1] - prompt_length
            predicted, target = logits[0, -length - 1:-1], ids[0, -length:]
            loss = F.cross_entropy(predicted.float(), target)  # the mean token loss, as HF's labels give it
            greedy = bool((predicted.argmax(dim=-1) == target).all())
            results.append(GenerationResult(text=(float(loss), greedy)))  # bare tuples are stringified (0.7.3)
        self._log_costs(time.perf_counter() - start, 0)
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("tokred's lmms-eval plugin does not run multi-round generation tasks")
