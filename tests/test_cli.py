"""The command line as a whole: --version, plain help text, clear one-line errors (wrong stage,
missing extra), and tokred bench on a Hugging Face VLM checkpoint folder."""
from __future__ import annotations

import json
import re

import pytest

import tokred
from tokred.cli import COMMANDS, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"tokred {tokred.__version__}"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit):
        main(["--help"] if command is None else [command, "--help"])
    text = capsys.readouterr().out
    assert "usage: tokred" in text
    assert "``" not in text and not re.search(r":(func|class|data|mod|meth):", text), text


def test_projector_reducer_on_a_vit_is_a_one_line_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--reducers", "none,divprune:keep=0.5", "--limit", "4", "--rounds", "1", "--no-progress",
              "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "tokred bench: error: DivPrune acts at the 'projector' stage" in err


def test_missing_extra_names_it(monkeypatch, capsys, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "scikit-learn is not installed" in err and "pip install 'tokred[sweep]'" in err


def test_an_uncaught_module_error_of_an_extra_names_it(monkeypatch, capsys):
    from tokred.cli import viz

    def missing(args):
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    monkeypatch.setattr(viz, "main", missing)
    with pytest.raises(SystemExit):
        main(["viz"])
    assert "pip install 'tokred[hf]'" in capsys.readouterr().err


# a Hugging Face VLM checkpoint --------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random LLaVA-1.5 saved with a word-level tokenizer and a CLIP image processor."""
    from helpers import IMAGE_TOKEN, tiny_llava
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    model = tiny_llava("llava")
    vocab = {f"w{i}": i for i in range(IMAGE_TOKEN)} | {"<image>": IMAGE_TOKEN}
    vocab["<unk>"], vocab["<pad>"] = 1, 0
    vocab = {word: index for word, index in vocab.items() if word not in ("w0", "w1")}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(["<image>", "<pad>", "<unk>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    path = tmp_path_factory.mktemp("tiny_llava")
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_bench_runs_reducer_specs_on_a_vlm_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(checkpoint), "--limit", "2", "--max-new-tokens", "3", "--out", str(out),
                 "--reducers", "none,tome:r=2+divprune:keep=0.5,dart:keep=0.5/layer=2"]) == 0
    report = json.loads((out / "bench_vlm.json").read_text())
    rows = {row["reducer"]: row for row in report["results"]}
    assert list(rows) == ["none", "tome:r=2+divprune:keep=0.5", "dart:keep=0.5/layer=2"]
    assert rows["none"]["flops_ratio"] == 1.0 and rows["none"]["answer_agreement"] == 1.0
    assert all(0 < row["flops_ratio"] < 1 for row in report["results"][1:])
    assert len(report["prompts"]) == 2 and all(len(row["answers"]) == 2 for row in report["results"])
    assert rows["dart:keep=0.5/layer=2"]["llm_tokens_last_layer"] < rows["none"]["llm_tokens_last_layer"]
    printed = capsys.readouterr().out
    assert "answers agree" in printed and "tome:r=2+divprune:keep=0.5" in printed


def test_bench_vlm_prompts_file(checkpoint, tmp_path, capsys):
    """--prompts: blank lines skipped, --limit lines; a line with the image token is used as written, the
    others wrapped in the chat layout (issue 24 point 4); the prompts used are printed."""
    questions = tmp_path / "questions.txt"
    questions.write_text("<image> w5 w6\n\nw8 w9\nw10\n")
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(checkpoint), "--prompts", str(questions), "--limit", "2", "--rounds", "1",
                 "--max-new-tokens", "2", "--reducers", "none,divprune:keep=0.5", "--out", str(out)]) == 0
    report = json.loads((out / "bench_vlm.json").read_text())
    assert report["prompts"][0] == "<image> w5 w6" and report["prompts"][1].endswith("\nw8 w9 ASSISTANT:")
    assert len(report["prompts"]) == 2
    printed = capsys.readouterr().out
    assert f"from the lines of {questions}" in printed and "prompt: '<image> w5 w6'" in printed


def test_vlm_options_need_a_checkpoint(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "--prompts", str(tmp_path / "q.txt"), "--out", str(tmp_path)])
    assert "are for a VLM checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["viz"])
def test_other_commands_refuse_a_vlm_checkpoint_clearly(checkpoint, command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--model", str(checkpoint)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "checkpoint" in err and "tokred bench --model" in err


def test_a_folder_that_is_no_checkpoint_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--model", str(tmp_path)])
    assert "not a Hugging Face checkpoint folder" in capsys.readouterr().err


# clear one-line errors for shared options (issue 19 point 11, issue 24 point 5) ----------------------
def _not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image\n")
    return path


@pytest.mark.parametrize("argv, message", [
    (["bench", "--device", "banana"], "--device banana: not a torch device; use e.g. cpu, cuda"),
    (["sweep", "--device", "banana", "--no-calibration"], "--device banana: not a torch device"),
    (["bench", "--model", "vit_no_such_model"], "--model vit_no_such_model: timm has no such model"),
    (["viz", "--model", "vit_no_such_model"], "--model vit_no_such_model: timm has no such model"),
    (["viz", "--image", "NOT_AN_IMAGE"], "--image NOT_AN_IMAGE is not an image that PIL can read"),
    (["viz", "--model", "vit_no_such_model", "--image", "NOT_AN_IMAGE"], "is not an image that PIL can read"),
    (["bench", "--model", "assets/digit_vlm"], "--model assets/digit_vlm: no such folder"),
    (["sweep", "--model", "assets/digit_vlm"], "--model assets/digit_vlm: no such folder"),
    (["viz", "--model", "./nothere"], "--model ./nothere: no such folder"),
])
def test_bad_shared_options_are_one_line_errors(argv, message, tmp_path, capsys):
    image = str(_not_an_image(tmp_path))
    argv = [image if a == "NOT_AN_IMAGE" else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--out", str(tmp_path / ("out.png" if argv[0] == "viz" else "out"))])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert f"tokred {argv[0]}: error: " in err and message.replace("NOT_AN_IMAGE", image) in err


@pytest.mark.parametrize("command", ["bench", "sweep"])
def test_a_missing_gpu_is_a_one_line_error(command, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_:
        main([command, "--device", "cuda", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "--device cuda is not available on this machine" in err and "use --device cpu" in err


def test_a_non_image_for_a_vlm_checkpoint_is_refused_before_it_loads(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--model", str(checkpoint), "--image", str(_not_an_image(tmp_path)), "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "is not an image that PIL can read" in capsys.readouterr().err


# tokred bench --model <VLM folder>: prompts and timing options (issue 24 point 4, issue 19 point 6) -----
def test_bench_vlm_uses_the_folders_questions(tmp_path, capsys):
    """The shipped digits VLM is asked its own questions.jsonl, the first --limit of each family."""
    from tokred.cli import vlm_sweep
    from tokred.reference import assets_dir

    folder = assets_dir() / "digits_vlm"
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(folder), "--limit", "1", "--max-new-tokens", "1", "--rounds", "1",
                 "--reducers", "none,divprune:keep=0.5", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "bench_vlm.json").read_text())
    questions = vlm_sweep.read_questions(folder / "questions.jsonl")
    firsts = [next(q for q in questions if q.family == f) for f in dict.fromkeys(q.family for q in questions)]
    assert report["prompts"] == [q.prompt for q in firsts] and len(firsts) == 6
    assert report["settings"]["image"] is None and "questions.jsonl" in report["settings"]["prompts_from"]
    printed = capsys.readouterr().out
    assert f"on 6 prompts from {folder / 'questions.jsonl'}, the first 1 of each question family" in printed
    assert all(f"prompt: {q.prompt!r}" in printed for q in firsts)


def test_bench_vlm_honours_device_threads_and_rounds(checkpoint, tmp_path, monkeypatch):
    """--device moves the model (a GPU is faked: the move is recorded, the model stays on the CPU), the
    prefill timing runs --rounds rounds with --threads CPU threads, and torch's setting comes back."""
    import torch

    from tokred.cli import checks, vlm, vlm_sweep

    moved, timed = [], []
    load, prefill_seconds = vlm.load, vlm_sweep.prefill_seconds

    def fake_load(path):
        model, processor = load(path)
        to = model.to
        monkeypatch.setattr(model, "to", lambda device: (moved.append(device), to("cpu"))[1], raising=False)
        return model, processor

    def spy(model, inputs, settings, rounds, **kwargs):
        timed.append((rounds, torch.get_num_threads()))
        return prefill_seconds(model, inputs, settings, rounds, **kwargs)

    monkeypatch.setattr(vlm, "load", fake_load)
    monkeypatch.setattr(vlm_sweep, "prefill_seconds", spy)
    monkeypatch.setattr(checks, "device", lambda text: torch.device(text))
    threads = torch.get_num_threads() + 1
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(checkpoint), "--device", "cuda", "--threads", str(threads), "--rounds", "3",
                 "--limit", "1", "--max-new-tokens", "1", "--reducers", "none,divprune:keep=0.5",
                 "--out", str(out)]) == 0
    assert moved == [torch.device("cuda")] and timed == [(3, threads)] and torch.get_num_threads() == threads - 1
    report = json.loads((out / "bench_vlm.json").read_text())
    assert report["settings"]["device"] == "cuda" and report["timing"]["rounds"] == 3
    assert report["timing"]["threads"] == threads and report["timing"]["clock"] == "wall"
    assert all(row["prefill_time_ratio"] > 0 for row in report["results"])
