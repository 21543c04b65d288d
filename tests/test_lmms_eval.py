"""The lmms-eval plugin (tokred.integrations.lmms_eval) and the digits tasks (evals/lmms_tasks/digits/).

Needs lmms-eval: `make test-lmms` installs tokred[lmms] in .venv-lmms and runs this file; elsewhere these
tests skip (all but the first). Everything runs offline on the shipped digits VLM, on CPU."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tokred
from tokred.reference import assets_dir

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = assets_dir() / "digits_vlm"
TASKS = REPO / "evals" / "lmms_tasks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
needs_lmms = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                reason="lmms-eval is not installed: `make test-lmms` installs tokred[lmms], runs these")
#: documents per task in the runs below
LIMIT = 8
SPECS = ("none", "divprune:keep=0.25", "dart:layer=2/keep=0.25")


def test_importing_tokred_imports_no_lmms_eval():
    code = ("import sys, tokred, tokred.integrations; "
            "print(sorted(m for m in sys.modules if m.startswith(('lmms_eval', 'tokred.integrations.lmms_eval'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# helpers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        patch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf")))
        yield


def task_utils():
    """evals/lmms_tasks/digits/utils.py (loaded under a name of its own: lmms-eval loads it as `utils`)."""
    spec = importlib.util.spec_from_file_location("tokred_digits_task_utils", TASKS / "digits" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(spec: str = "none", **args):
    from lmms_eval.models import get_model

    text = ",".join([f"pretrained={CHECKPOINT}", f"reducers={spec}", "local_files_only=true",
                     *(f"{k}={v}" for k, v in args.items())])
    return get_model("tokred").create_from_arg_string(text, {"device": "cpu"})


def requests(lm, docs: list[dict], kind: str = "generate_until") -> list:
    """lmms-eval requests (``.args`` as the evaluator builds them) for the digits documents ``docs``."""
    utils = task_utils()
    lm.task_dict["digits"] = {"test": docs}
    gen_kwargs = {"until": ["\n"], "max_new_tokens": 24, "do_sample": False}
    out = []
    for i, doc in enumerate(docs):
        second = dict(gen_kwargs) if kind == "generate_until" else " " + utils._example(doc).target
        out.append(SimpleNamespace(args=(utils.doc_to_text(doc), second, utils.doc_to_visual, i, "digits", "test")))
    return out


def mixed_docs(count: int) -> list[dict]:
    families = ("describe", "cell", "sum", "exists")  # prompts of different lengths: left padding in a batch
    return [{"family": families[i % len(families)], "index": i} for i in range(count)]


# registration and arguments ----------------------------------------------------------------------------
@needs_lmms
def test_the_entry_point_registers_the_model():
    from lmms_eval.models import get_model, list_available_models

    from tokred.integrations.lmms_eval import TokredModel

    assert "tokred" in list_available_models()
    assert get_model("tokred") is TokredModel


@needs_lmms
def test_model_args_carry_a_registry_spec(offline):
    spec = "divprune:keep=0.25+dart:layer=2/keep=0.5"
    lm = make_model(spec, batch_size="3", dtype="float32")
    assert tokred.reducers_of(lm.model) == tokred.parse_spec(spec)
    assert lm.batch_size == 3 and lm.device == torch.device("cpu") and (lm.rank, lm.world_size) == (0, 1)
    assert make_model("none").reducers == ()


@needs_lmms
@pytest.mark.parametrize("args, message", [
    ("reducers=divprune:keep=0.25,dart:keep=0.5", r"unknown --model_args.*'dart:keep'.*joined by '\+'"),
    ("reducers=divprune:kept=0.25", "unknown parameter 'kept' for divprune"),
    ("reducers=nosuch:keep=0.25", "unknown reducer 'nosuch'"),
    ("dtype=float8", "dtype='float8'; expected one of"),
    ("chat_template=vicuna", "chat_template='vicuna'; expected one of"),
    ("batch_size=0", "batch_size=0; expected a positive integer"),
])
def test_bad_model_args_are_refused_clearly(offline, args, message):
    from lmms_eval.models import get_model

    with pytest.raises(ValueError, match=message):
        get_model("tokred").create_from_arg_string(f"pretrained={CHECKPOINT},{args}", {"device": "cpu"})


@needs_lmms
def test_video_inputs_are_refused_clearly(offline):
    lm = make_model()
    lm.task_dict["clips"] = {"test": [{}]}
    request = SimpleNamespace(args=("what happens", {"until": ["\n"]}, lambda doc: ["clip.mp4"], 0, "clips", "test"))
    with pytest.raises(ValueError, match="video inputs"):
        lm.generate_until([request])


@needs_lmms
def test_device_placement():
    from tokred.integrations.lmms_eval import placement

    assert placement(None, 1, 0, cuda=False) == "cpu"
    assert placement("auto", 1, 0, cuda=True) == "cuda"
    assert placement("cuda:1", 1, 0, cuda=True) == "cuda:1"
    assert placement("cuda", 4, 3, cuda=True) == "cuda:3"  # accelerate launch: one GPU per local process
    assert placement("cuda:0", 2, 1, cuda=True) == "cuda:1"
    assert placement("cpu", 2, 1, cuda=True) == "cpu"
    assert placement(None, 2, 1, cuda=False) == "cpu"


@needs_lmms
def test_cost_summary_by_hand():
    from tokred.integrations.lmms_eval import COST_METRICS, costs, summarise

    records = [{"flops": 10.0, "flops_full": 40.0, "visual": 16, "visual_full": 64},
               {"flops": 30.0, "flops_full": 40.0, "visual": 32, "visual_full": 64}]
    row = summarise(records)
    assert set(row) == set(COST_METRICS)
    assert row["requests"] == 2 and row["prefill_flops_mean"] == 20 and row["prefill_flops_std"] == 10
    assert row["prefill_flops_ratio"] == 0.5 and row["visual_tokens_ratio"] == 0.375
    assert row["visual_tokens_mean"] == 24 and row["visual_tokens_std"] == 8 and row["visual_tokens_full"] == 64
    unmeasured = summarise([{**r, "flops_full": None} for r in records])  # measure_full=false
    assert "prefill_flops_ratio" not in unmeasured and unmeasured["prefill_flops_mean"] == 20
    throughput = {"avg_speed": 1.0, "avg_tokred/a_b/requests": 2, "avg_tokred/a_b/prefill_flops_ratio": 0.5}
    assert costs({"throughput": throughput}) == {"a_b": {"requests": 2, "prefill_flops_ratio": 0.5}}


# requests ----------------------------------------------------------------------------------------------
@needs_lmms
def test_prompts_put_the_images_first(offline):
    """Without a chat template the task's text is used as written, with the image token put in front when
    it lacks one per image; with one, the images are content items before the text (the digits VLM has
    no template: this one renders exactly its training prompt, so the answers must not change)."""
    lm = make_model()
    assert lm.plain_prompts and lm.prompt("<image> describe the image ?", 1) == "<image> describe the image ?"
    assert lm.prompt("describe the image ?", 1) == "<image>\ndescribe the image ?"
    assert lm.prompt("describe the image ?", 0) == "describe the image ?"
    docs = mixed_docs(3)
    plain = [r.text for r in lm.generate_until(requests(lm, docs))]
    lm.processor.chat_template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                                  "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    lm.plain_prompts = False
    assert lm.prompt("<image> describe the image ?", 1) == "<image> describe the image ?"
    assert lm.prompt("describe the image ?", 1) == "<image> describe the image ?"
    assert [r.text for r in lm.generate_until(requests(lm, docs))] == plain


@needs_lmms
def test_batches_equal_one_by_one_and_cached_generation_equals_uncached(offline):
    """Under DART (llm stage), batches of mixed prompt lengths give the answers one-by-one requests give,
    and those are the greedy answers of an uncached loop that re-runs the whole sequence every step
    (``prompt_length`` keeps the reducer's decisions on the prompt)."""
    spec = "dart:layer=2/keep=0.25"
    docs = mixed_docs(6)
    lm, batching = make_model(spec), make_model(spec, batch_size=4)
    one = [r.text for r in lm.generate_until(requests(lm, docs))]
    batched = [r.text for r in batching.generate_until(requests(batching, docs))]
    assert batched == one
    model, processor = lm.model, lm.processor
    eos = model.generation_config.eos_token_id
    for request, answer in zip(requests(lm, docs[:3]), one[:3]):
        context, _, doc_to_visual, doc_id, _, _ = request.args
        inputs = processor(text=[context], images=doc_to_visual(docs[doc_id]), return_tensors="pt")
        ids, prompt_length = inputs["input_ids"], inputs["input_ids"].shape[1]
        with torch.no_grad():
            for _ in range(24):
                logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], use_cache=False,
                               prompt_length=prompt_length).logits
                token = logits[:, -1].argmax(dim=-1, keepdim=True)
                ids = torch.cat([ids, token], dim=1)
                if int(token) == eos:
                    break
        assert processor.batch_decode(ids[:, prompt_length:], skip_special_tokens=True)[0] == answer


@needs_lmms
@pytest.mark.parametrize("spec", ["none", "divprune:keep=0.25"])
def test_loglikelihood_is_the_mean_token_loss_of_the_continuation(offline, spec):
    """lmms-eval's convention: the loss transformers computes with the prompt masked (-100), on the model as
    patched (tokred maps the labels onto the kept tokens); a callable continuation is doc_to_target."""
    from lmms_eval.api.instance import GenerationResult

    lm = make_model(spec)
    docs = mixed_docs(4)
    reqs = requests(lm, docs, kind="loglikelihood")
    utils = task_utils()
    reqs[1].args = (reqs[1].args[0], lambda doc: " " + utils._example(doc).target, *reqs[1].args[2:])
    answers = lm.loglikelihood(reqs)
    assert all(isinstance(a, GenerationResult) for a in answers)  # lmms-eval 0.7.3 would stringify a tuple
    for request, answer in zip(reqs, answers):
        context, _, doc_to_visual, doc_id, _, _ = request.args
        target = " " + utils._example(docs[doc_id]).target
        images = doc_to_visual(docs[doc_id])
        prompt_length = lm.processor(text=[context], images=images, return_tensors="pt")["input_ids"].shape[1]
        inputs = lm.processor(text=[context + target], images=images, return_tensors="pt")
        labels = inputs["input_ids"].clone()
        labels[:, :prompt_length] = -100
        with torch.no_grad():
            out = lm.model(**inputs, labels=labels, prompt_length=prompt_length)
        loss, greedy = answer.text
        assert loss == pytest.approx(float(out.loss), rel=1e-5, abs=1e-6)
        length = inputs["input_ids"].shape[1] - prompt_length
        expected = bool((out.logits[0, -length - 1:-1].argmax(-1) == inputs["input_ids"][0, -length:]).all())
        assert greedy == expected


# whole runs ---------------------------------------------------------------------------------------------
def sweep_accuracy(model, processor, families: list[str], specs, limit: int = LIMIT) -> dict[str, dict[str, float]]:
    """tokred sweep (tokred.cli.vlm_sweep.run) on the first ``limit`` questions of each family:
    {spec: {family: accuracy}}."""
    from tokred.cli import vlm_sweep

    utils = task_utils()
    questions = []
    for family in families:
        for index in range(limit):
            doc = {"family": family, "index": index}
            question = utils.question(doc)
            questions.append(vlm_sweep.Question(**{**question.__dict__, "images": tuple(utils.doc_to_visual(doc))}))
    settings = [(spec, spec, 1.0, tokred.parse_spec(spec)) for spec in specs if spec != "none"]
    report = vlm_sweep.run(model, processor, questions, settings, batch_size=4, max_new_tokens=24, rounds=1,
                           progress=False)
    return {row["spec"]: {f: row["families"][f]["accuracy"] for f in families} for row in report["results"]}


@needs_lmms
def test_python_api_scores_like_tokred_sweep_and_reports_the_cost(offline):
    """simple_evaluate on the digits tasks: per family the accuracy tokred sweep reports for the same model,
    questions and reducer; the multiple-choice variant picks the choice of lowest loss; per task the FLOPs
    and visual tokens, equal to tokred.flops on a request's inputs."""
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from tokred.integrations.lmms_eval import costs

    families = ["describe", "cell", "count"]
    tasks = [f"tokred_digits_{f}" for f in families] + ["tokred_digits_describe_mc"]
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    measured, models = {}, {}
    for spec in SPECS:
        lm = make_model(spec, batch_size=4)
        models[spec] = (lm.model, lm.processor)  # lm.clean() drops them after the run
        measured[spec] = evaluator.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=LIMIT)
    model, processor = models["none"]
    tokred.remove(model)
    expected = sweep_accuracy(model, processor, families, SPECS)
    print("lmms-eval vs tokred sweep, accuracy on", LIMIT, "questions per family")
    utils = task_utils()
    for spec, out in measured.items():
        results = out["results"]
        mine = {f: results[f"tokred_digits_{f}"]["accuracy,none"] for f in families}
        print(f"  {spec:28s} lmms-eval {mine}  sweep {expected[spec]}")
        assert mine == pytest.approx(expected[spec], abs=1e-12)
        # multiple choice: the lowest mean loss among the choices, on the model as patched
        reduced, _ = models[spec]
        tokred.apply(reduced, *tokred.parse_spec(spec))
        right = 0
        for index in range(LIMIT):
            doc = {"family": "describe", "index": index}
            context, images = utils.doc_to_text(doc), utils.doc_to_visual(doc)
            prompt_length = processor(text=[context], images=images, return_tensors="pt")["input_ids"].shape[1]
            losses = []
            for choice in utils.doc_to_choice(doc):
                inputs = processor(text=[f"{context} {choice}"], images=images, return_tensors="pt")
                labels = inputs["input_ids"].clone()
                labels[:, :prompt_length] = -100
                with torch.no_grad():
                    losses.append(float(reduced(**inputs, labels=labels, prompt_length=prompt_length).loss))
            right += min(range(len(losses)), key=losses.__getitem__) == utils.doc_to_choice_target(doc)
        assert results["tokred_digits_describe_mc"]["acc,none"] == pytest.approx(right / LIMIT)
        # the cost: a request's prefill FLOPs and visual tokens, against the unreduced model's
        cost = costs(out)
        assert set(cost) == set(tasks)
        doc = {"family": "describe", "index": 0}
        inputs = processor(text=[utils.doc_to_text(doc)], images=utils.doc_to_visual(doc), return_tensors="pt")
        full_visual = int((inputs["input_ids"] == reduced.config.image_token_id).sum())
        full = tokred.flops(model, **inputs, logits_to_keep=1).total
        flops = tokred.flops(reduced, **inputs, logits_to_keep=1).total
        row = cost["tokred_digits_describe"]
        keep = 1.0 if spec == "none" else tokred.parse_spec(spec)[0].keep
        assert row["requests"] == LIMIT and row["visual_tokens_full"] == full_visual
        assert row["visual_tokens_mean"] == round(keep * full_visual) and row["visual_tokens_std"] == 0
        assert row["prefill_flops_mean"] == pytest.approx(flops) and row["prefill_flops_std"] == 0
        assert row["prefill_flops_ratio"] == pytest.approx(flops / full)
        assert (row["prefill_flops_ratio"] < 1) == (spec != "none")
        assert cost["tokred_digits_describe_mc"]["requests"] == LIMIT * (utils.DISTRACTORS + 1)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@needs_lmms
def test_command_line_offline_writes_scores_and_cost(tmp_path):
    """The lmms-eval command on the local tasks with no reducer and two specs, one of them sharded over two
    processes by accelerate launch (data parallel on CPU): the results files hold the accuracy tokred sweep
    gives on the same questions and the FLOPs ratio (the CLI exits 0 even when the evaluation fails, so the
    results file is what is checked)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tokred.integrations.lmms_eval import costs

    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    limit = 4
    runs = {}
    for spec in SPECS:
        out = tmp_path / spec.replace(":", "_").replace("/", "_").replace("=", "")
        launcher = [sys.executable, "-m", "lmms_eval"]
        if spec == SPECS[1]:
            launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                        "-m", "lmms_eval"]
        command = [*launcher, "--model", "tokred", "--model_args", f"pretrained={CHECKPOINT},reducers={spec}",
                   "--tasks", "tokred_digits_describe,tokred_digits_describe_mc", "--include_path", str(TASKS),
                   "--device", "cpu", "--batch_size", "4", "--limit", str(limit), "--output_path", str(out)]
        runs[spec] = (out, subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True))
    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT, local_files_only=True)
    expected = sweep_accuracy(model, processor, ["describe"], SPECS, limit)
    for spec, (out, process) in runs.items():
        log = process.communicate(timeout=900)[0]
        assert process.returncode == 0, log[-3000:]
        files = list(out.rglob("*_results.json"))
        assert len(files) == 1, log[-3000:]
        results = json.loads(files[0].read_text())
        assert results["config"]["model_args"].endswith(f"reducers={spec}")
        accuracy = results["results"]["tokred_digits_describe"]["accuracy,none"]
        assert accuracy == pytest.approx(expected[spec]["describe"])
        assert 0 <= results["results"]["tokred_digits_describe_mc"]["acc,none"] <= 1
        cost = costs(results)
        assert cost["tokred_digits_describe"]["requests"] == limit  # both processes' requests
        assert cost["tokred_digits_describe_mc"]["requests"] == limit * (task_utils().DISTRACTORS + 1)
        ratio = cost["tokred_digits_describe"]["prefill_flops_ratio"]
        assert ratio == 1.0 if spec == "none" else 0 < ratio < 1
