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


def results_file(folder: Path, spec: str, accuracy: float, flops: float | None, ratio: float | None) -> Path:
    """A results file as lmms-eval writes it for a tokred run (the keys tokred report reads; costs optional)."""
    throughput = {"avg_speed": 3.0}
    if flops is not None:
        throughput |= {"avg_tokred/digits/prefill_flops_mean": flops, "avg_tokred/digits/visual_tokens_mean": 16.0,
                       "avg_tokred/digits/requests": 4.0}
    if ratio is not None:
        throughput["avg_tokred/digits/prefill_flops_ratio"] = ratio
    results = {"results": {"digits": {"alias": "digits", "accuracy,none": accuracy, "accuracy_stderr,none": 0.1}},
               "higher_is_better": {"digits": {"accuracy": True}}, "throughput": throughput,
               "config": {"model": "tokred", "model_args": f"pretrained=assets/digits_vlm,reducers={spec}"}}
    folder.mkdir(parents=True)
    path = folder / "20261208_000000_results.json"
    path.write_text(json.dumps(results))
    return path


def test_report_collects_runs_into_one_table_and_plot(tmp_path, capsys):
    """tokred report on two result folders and a file: one row per run, most FLOPs first, the spec from
    config.model_args, the costs from throughput; a run without costs shows n/a."""
    from tokred.cli import main

    results_file(tmp_path / "runs" / "a" / "digits_vlm", "none", 0.5, 2e9, 1.0)
    results_file(tmp_path / "runs" / "b" / "digits_vlm", "divprune:keep=0.25", 0.25, 1e9, 0.5)
    other = results_file(tmp_path / "c", "dart:keep=0.5/layer=2", 0.375, None, None)
    assert main(["report", str(tmp_path / "runs"), str(other), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "report.md").read_text()
    assert table in capsys.readouterr().out
    assert report_cells(table) == [["none", "digits", "accuracy", "0.5000", "2.0000", "1.000", "16.0", "4", "assets/digits_vlm"],
                     ["divprune:keep=0.25", "digits", "accuracy", "0.2500", "1.0000", "0.500", "16.0", "4",
                      "assets/digits_vlm"],
                     ["dart:keep=0.5/layer=2", "digits", "accuracy", "0.3750", "n/a", "n/a", "n/a", "n/a",
                      "assets/digits_vlm"]]
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def report_cells(table: str) -> list[list[str]]:
    """The body cells of a Markdown table."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nothere", "no such file or folder"),
    (lambda d: d, "no lmms-eval results"),
    (lambda d: (d / "x_results.json").write_text("{}") and d / "x_results.json", "is not an lmms-eval results file"),
])
def test_report_refuses_what_is_not_a_run(tmp_path, capsys, make, message):
    from tokred.cli import main

    with pytest.raises(SystemExit) as error:
        main(["report", str(make(tmp_path)), "--out", str(tmp_path / "out")])
    assert error.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


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
    ("reducers=fastv", "reducer 'fastv' needs keep"),
    ("dtype=float8", "dtype='float8'; expected one of"),
    ("chat_template=vicuna", "chat_template='vicuna'; expected one of"),
    ("batch_size=0", "batch_size=0; expected a positive integer"),
])
def test_bad_model_args_are_refused_clearly(offline, args, message):
    """A SystemExit (status 1): lmms-eval's command line catches every Exception of a run and exits 0."""
    from lmms_eval.models import get_model

    from tokred.integrations.lmms_eval import ModelArgsError

    with pytest.raises(ModelArgsError, match=message) as error:
        get_model("tokred").create_from_arg_string(f"pretrained={CHECKPOINT},{args}", {"device": "cpu"})
    assert isinstance(error.value, SystemExit) and error.value.code == str(error.value)
    assert str(error.value).startswith("tokred model, bad --model_args: ")


@needs_lmms
def test_a_missing_checkpoint_is_refused_clearly(offline, tmp_path):
    from lmms_eval.models import get_model

    from tokred.integrations.lmms_eval import ModelArgsError

    with pytest.raises(ModelArgsError, match=str(tmp_path / "nothere")):
        get_model("tokred").create_from_arg_string(f"pretrained={tmp_path / 'nothere'},local_files_only=true",
                                                   {"device": "cpu"})


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

    records = [{"flops": 10.0, "flops_full": 40.0, "visual": 16, "visual_full": 64, "rank": 0},
               {"flops": 30.0, "flops_full": 40.0, "visual": 32, "visual_full": 64, "rank": 1}]
    row = summarise(records)
    assert set(row) == set(COST_METRICS)
    assert row["requests"] == 2 and row["processes"] == 2 and summarise(records[:1] * 3)["processes"] == 1
    assert row["prefill_flops_mean"] == 20 and row["prefill_flops_std"] == 10
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


def lmms_eval_command(out: Path, model_args: str, tasks: str, processes: int = 1, limit: int = 4) -> list[str]:
    """The lmms-eval command line on the local tasks; ``processes`` > 1: under ``accelerate launch --multi_gpu``,
    the form that starts that many ranks on a CPU machine too (``--cpu`` starts one)."""
    launcher = [sys.executable, "-m", "lmms_eval"]
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port()), "-m", "lmms_eval"]
    return [*launcher, "--model", "tokred", "--model_args", model_args, "--tasks", tasks, "--include_path", str(TASKS),
            "--device", "cpu", "--batch_size", "4", "--limit", str(limit), "--output_path", str(out)]


def lmms_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}


@needs_lmms
def test_command_line_offline_writes_scores_and_cost(tmp_path):
    """The lmms-eval command on the local tasks with no reducer and two specs, one of them also sharded over
    two processes (data parallel on CPU): the results files hold the accuracy tokred sweep gives on the same
    questions and the FLOPs ratio; the two ranks really ran (each answered its share) and their merged
    results equal the one-process run's."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tokred.integrations.lmms_eval import costs

    limit, tasks = 4, "tokred_digits_describe,tokred_digits_describe_mc"
    runs = {}
    for spec, processes in [*((spec, 1) for spec in SPECS), (SPECS[1], 2)]:
        out = tmp_path / f"{spec.replace(':', '_').replace('/', '_').replace('=', '')}_x{processes}"
        command = lmms_eval_command(out, f"pretrained={CHECKPOINT},reducers={spec}", tasks, processes, limit)
        runs[spec, processes] = (out, subprocess.Popen(command, env=lmms_env(tmp_path), cwd=tmp_path, text=True,
                                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT, local_files_only=True)
    expected = sweep_accuracy(model, processor, ["describe"], SPECS, limit)
    measured = {}
    for (spec, processes), (out, process) in runs.items():
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
        assert cost["tokred_digits_describe"]["requests"] == limit  # every process's requests
        assert cost["tokred_digits_describe_mc"]["requests"] == limit * (task_utils().DISTRACTORS + 1)
        assert {row["processes"] for row in cost.values()} == {processes}  # each process answered its share
        for rank in range(2):
            assert (f"Running on rank {rank} " in log) == (rank < processes), log[-3000:]
        ratio = cost["tokred_digits_describe"]["prefill_flops_ratio"]
        assert ratio == 1.0 if spec == "none" else 0 < ratio < 1
        measured[spec, processes] = results
    one, two = measured[SPECS[1], 1], measured[SPECS[1], 2]
    assert two["results"] == one["results"]  # the merged scores are the one-process run's
    for task, row in costs(one).items():  # and so are the merged costs
        assert {**costs(two)[task], "processes": 1} == pytest.approx(row)
    # tokred report on these runs: one row per run with its spec, score and FLOPs ratio
    from tokred.cli import main

    assert main(["report", *(str(out) for out, _ in runs.values()), "--out", str(tmp_path / "report")]) == 0
    rows = [r for r in report_cells((tmp_path / "report" / "report.md").read_text())
            if r[1:3] == ["tokred_digits_describe", "accuracy"]]
    assert sorted((r[0], r[3], r[5]) for r in rows) == sorted(
        (spec, f"{results['results']['tokred_digits_describe']['accuracy,none']:.4f}",
         f"{costs(results)['tokred_digits_describe']['prefill_flops_ratio']:.3f}")
        for (spec, _), results in measured.items())


@needs_lmms
def test_command_line_fails_on_a_bad_spec(tmp_path):
    """A bad spec (fastv without keep) stops the lmms-eval command with exit status 1 and the message, before
    any request, and writes no results (lmms-eval itself exits 0 when a run raises)."""
    command = lmms_eval_command(tmp_path / "out", f"pretrained={CHECKPOINT},reducers=fastv", "tokred_digits_describe")
    run = subprocess.run(command, env=lmms_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert "tokred model, bad --model_args: bad reducer spec 'fastv': reducer 'fastv' needs keep" in run.stderr
    assert not list(tmp_path.rglob("*_results.json"))
