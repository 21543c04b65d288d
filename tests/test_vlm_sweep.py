"""``tokred sweep --model <VLM checkpoint>`` (tokred/cli/vlm_sweep.py): the question file format and
its errors, the scoring rules by hand, the default settings, and a short sweep of the shipped digits
VLM (keep-everything == unreduced, the JSON / Markdown / plot / README outputs)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tokred.cli import main
from tokred.cli import vlm_sweep as vs
from tokred.reference import assets_dir

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = assets_dir() / "digits_vlm"


def _write(tmp_path, records, image=True):
    if image:
        from PIL import Image

        Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_read_questions(tmp_path):
    path = _write(tmp_path, [{"image": "a.png", "question": "How many?", "answer": "2", "family": "count"},
                             "",
                             {"images": ["a.png", "a.png"], "prompt": "<image><image> same?", "answer": "yes",
                              "score": "last_word"}])
    first, second = vs.read_questions(path)
    assert first == vs.Question(answer="2", question="How many?", images=(tmp_path / "a.png",), family="count")
    assert second.prompt == "<image><image> same?" and len(second.images) == 2
    assert second.family == "all" and second.score == "last_word"


@pytest.mark.parametrize("record, message", [
    ("{not json", "not JSON"),
    ({"image": "a.png", "question": "q", "answer": "a", "colour": "red"}, "unknown keys ['colour']"),
    ({"image": "a.png", "question": "q", "prompt": "p", "answer": "a"}, "exactly one of 'question' and 'prompt'"),
    ({"image": "a.png", "question": "q"}, "no 'answer'"),
    ({"question": "q", "answer": "a"}, "no 'image'"),
    ({"image": "b.png", "question": "q", "answer": "a"}, "b.png not found"),
    ({"images": ["a.png", "a.png"], "question": "q", "answer": "a"}, "use 'prompt'"),
    ({"image": "a.png", "question": "q", "answer": "a", "score": "fuzzy"}, "score 'fuzzy' is not one of"),
])
def test_bad_question_files_say_what_is_wrong(tmp_path, record, message):
    with pytest.raises((ValueError, FileNotFoundError), match="line 1") as error:
        vs.read_questions(_write(tmp_path, [record]))
    assert message in str(error.value)


def test_scoring_rules_by_hand():
    exact = vs.Question(answer="Two dogs.")
    assert vs.score(exact, " two   DOGS ") == (1, 1, True)
    assert vs.score(exact, "two dogs and a cat") == (0, 1, False)
    last = vs.Question(answer="7", score="last_word")
    assert vs.score(last, "1 2 ; 3 + 4 = 7") == (1, 1, True) and vs.score(last, "7 1") == (0, 1, False)
    assert vs.score(last, "") == (0, 1, False)
    words = vs.Question(answer="1 empty 3 4", score="words")
    assert vs.score(words, "1 empty 9 4 ; extra") == (3, 4, False)
    assert vs.score(words, "1 empty 3 4 ;") == (4, 4, True)
    assert vs.score(words, "1") == (1, 4, False)
    assert vs.scored_part(last, "9 empty ; 3 + 4 = 7") == "7" and vs.scored_part(words, "1 empty") == "1 empty"


def test_wilson_interval():
    low, high = vs.wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert vs.wilson(0, 10)[0] == 0.0 and vs.wilson(10, 10)[1] == 1.0 and vs.wilson(0, 0) == (0.0, 1.0)


def test_default_settings():
    settings = vs.default_settings((0.5, 0.25), tower=(64, 4))
    specs = {(family, keep): spec for family, spec, keep in settings}
    assert specs["tome (vision)", 0.25] == "tome:r=12" and specs["tome (vision)", 0.5] == "tome:r=8"
    assert specs["pool", 0.25] == "pool:stride=2/stage=projector" and specs["dart", 0.5] == "dart:keep=0.5/layer=2"
    assert len(settings) == 2 * len(vs.VLM_SWEEPS)
    assert not any("tome" in family for family, _, _ in vs.default_settings((0.5,), tower=None))
    with pytest.raises(ValueError, match="pool has windows"):
        vs.default_settings((0.3,), ["pool"])
    with pytest.raises(ValueError, match="no default VLM sweep for"):
        vs.default_settings((0.5,), ["holitom-x"])


def _alone(model, processor, question) -> tuple[int, int]:
    """(visual tokens entering the language model, at its last layer) of one question run alone, from
    the unpadded sequence lengths: the LM's input and output rows minus the prompt's text tokens."""
    import torch

    import tokred

    inputs = vs.model_inputs(processor, [question])
    with torch.no_grad():
        model(**inputs)
    llm = [r for r in tokred.last_trace(model).layers if r.stage == "llm"]
    text = int(inputs["attention_mask"].sum()) - int((inputs["input_ids"] == model.config.image_token_id).sum())
    return llm[0].tokens_in - text, llm[-1].tokens_out - text


def test_visual_tokens_per_question_equal_each_question_alone():
    """In a left-padded batch of questions with different prompt lengths, the visual tokens per question
    (entering the LM, at its last layer) are those of each question run alone, for per-image counts in
    the tower (DToMe), at the projector (DivPrune) and inside the LM (ATP); the spread is the population one."""
    import torch

    import tokred
    from tokred.cli import vlm

    model, processor = vlm.load(CHECKPOINT)
    every = vs.read_questions(CHECKPOINT / "questions.jsonl")
    questions = every[:3] + every[-2:]                 # describe prompts and the longer sum prompts
    inputs = vs.model_inputs(processor, questions)
    cases = [(), (tokred.DToMe(thresholds=(0.9993, 0.9988, 0.9966, 0.98)),), (tokred.DivPrune(keep=0.25),),
             (tokred.ATP(layers=(1, 2, 3), thresholds=(0.9, 0.9, 0.5), strides=8),)]
    for reducers in cases:
        with tokred.applied(model, *reducers):
            with torch.no_grad():
                model(**inputs)
            entering, last = vs.visual_tokens(model, tokred.last_trace(model), inputs, questions)
            alone = [_alone(model, processor, q) for q in questions]
        assert (entering, last) == ([a[0] for a in alone], [a[1] for a in alone]), reducers
    assert len(set(entering)) == 1 and len(set(last)) > 1        # ATP: 64 in, a count per question out
    spread = vs._spread([2, 4], [1, 1], 2)
    assert spread == {"mean": 3, "std": 1.0, "last_mean": 1, "last_std": 0.0} and vs._spread([2], [2], 2) is None
    assert vs.format_tokens(spread) == "3.0 ± 1.0 → 1.0 ± 0.0"
    assert vs.format_tokens(vs._spread([4], [4], 1)) == "4.0 ± 0.0"
    assert vs.format_tokens(None) == "?"


def test_shipped_question_file_is_the_generator_slice(tmp_path):
    """assets/digits_vlm/questions.jsonl (and its PNGs) is what evals/sweep_vlm.py --export --slice writes."""
    sys.path.insert(0, str(REPO / "evals"))
    import sweep_vlm
    import vlm_data

    path = sweep_vlm.export(tmp_path, vlm_data.SLICE)
    assert path.read_text() == (CHECKPOINT / "questions.jsonl").read_text()
    for png in (tmp_path / "questions").iterdir():
        assert png.read_bytes() == (CHECKPOINT / "questions" / png.name).read_bytes()
    assert len(vs.read_questions(CHECKPOINT / "questions.jsonl")) == sum(vlm_data.SLICE.values())


def test_sweep_of_the_shipped_vlm(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{vs.README_START}\nold\n{vs.README_END}\ntail\n")
    out = tmp_path / "out"
    assert main(["sweep", "--model", str(CHECKPOINT), "--limit", "2", "--batch-size", "6", "--rounds", "1",
                 "--max-new-tokens", "20", "--specs", "divprune:keep=1.0,divprune:keep=0.25,fastv:keep=0.25/layer=2",
                 "--out", str(out), "--readme", str(readme), "--no-progress"]) == 0
    report = json.loads((out / vs.JSON_NAME).read_text())
    rows = report["results"]
    assert [r["spec"] for r in rows] == ["none", "divprune:keep=1.0", "divprune:keep=0.25", "fastv:keep=0.25/layer=2"]
    none, everything, divprune, fastv = rows
    assert everything["answers"] == none["answers"] and everything["families"] == none["families"]
    assert none["flops_ratio"] == 1.0 and none["families"]["describe"]["agreement"] == 1.0
    assert divprune["flops_ratio"] < 1 and fastv["flops_ratio"] < 1 and fastv["llm_tokens_last_layer"] < none["llm_tokens_last_layer"]
    every = vs.read_questions(CHECKPOINT / "questions.jsonl")
    families = list(dict.fromkeys(q.family for q in every))
    assert report["families"] == families and report["questions"] == 2 * len(families)   # --limit: 2 per family
    for row in rows:
        assert all(row["families"][f]["n"] == 2 for f in families)
        family = row["families"]["describe"]
        assert 0 <= family["ci95"][0] <= family["accuracy"] <= family["ci95"][1] <= 1
        assert row["prefill_gmacs"] * 2 == pytest.approx(row["prefill_gflops"]) and row["ttft_ratio"] > 0
    assert divprune["families"]["describe"]["accuracy"] < none["families"]["describe"]["accuracy"]
    assert none["visual_tokens"] == {"mean": 64, "std": 0, "last_mean": 64, "last_std": 0}
    assert divprune["visual_tokens"] == {"mean": 16, "std": 0, "last_mean": 16, "last_std": 0}
    assert fastv["visual_tokens"] == {"mean": 64, "std": 0, "last_mean": 16, "last_std": 0}
    assert none["flops_ratio_per_image"] == 1.0
    for row in (everything, divprune, fastv):   # a fixed count: alone or padded, about the same ratio
        assert row["flops_ratio_per_image"] == pytest.approx(row["flops_ratio"], abs=0.02)
    table = (out / vs.MARKDOWN_NAME).read_text()
    assert table.count("\n| ") == 1 + len(rows) and "describe % (95% CI)" in table
    assert " 64.0 ± 0.0 → 16.0 ± 0.0 |" in table and "visual tokens (mean ± std)" in table
    assert (out / vs.PLOT_NAME).stat().st_size > 10_000 and (tmp_path / vs.README_IMAGE).is_file()
    text = readme.read_text()
    assert "old" not in text and "`divprune:keep=0.25`" in text and text.endswith("tail\n")
    assert "TTFT ratio" in capsys.readouterr().out


def test_a_checkpoint_without_questions_needs_a_file(tmp_path, capsys):
    for item in CHECKPOINT.iterdir():
        if item.is_file() and item.name != "questions.jsonl":
            shutil.copy(item, tmp_path / item.name)
    with pytest.raises(SystemExit):
        main(["sweep", "--model", str(tmp_path), "--specs", "divprune:keep=0.5"])
    assert "ships no questions.jsonl: pass --questions" in capsys.readouterr().err


def test_per_family_takes_the_first_of_each_family():
    questions = [vs.Question(answer=str(i), family=f) for i, f in enumerate("aabab")]
    assert [q.answer for q in vs.per_family(questions, 1)] == ["0", "2"]
    assert [q.answer for q in vs.per_family(questions, 2)] == ["0", "1", "2", "4"]
    assert vs.per_family(questions, None) == questions


def test_limit_help_says_questions_per_family(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "questions per question family" in " ".join(capsys.readouterr().out.split())


def test_a_missing_question_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--model", str(CHECKPOINT), "--questions", str(tmp_path / "nothere.jsonl")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"question file {tmp_path / 'nothere.jsonl'} not found" in err
    assert "ships no" not in err


@pytest.mark.parametrize("argv, message", [
    (["--specs", "tom:r=2"], "unknown reducer 'tom' (did you mean 'tome'?)"),
    (["--reducers", "divprun"], "no default VLM sweep for ['divprun']"),
    (["--keeps", "2"], "--keeps must lie in (0, 1]"),
])
def test_the_spec_is_checked_before_the_model_loads(argv, message, monkeypatch, capsys, tmp_path):
    from tokred.cli import vlm

    def load(path):
        raise AssertionError("the model was loaded before the spec was checked")

    monkeypatch.setattr(vlm, "load", load)
    with pytest.raises(SystemExit):
        main(["sweep", "--model", str(CHECKPOINT), "--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_questions_need_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--questions", str(tmp_path / "q.jsonl"), "--no-calibration"])
    assert "--questions is for a VLM checkpoint" in capsys.readouterr().err


def test_evals_sweep_vlm_runs_tokred_sweep(tmp_path):
    """evals/sweep_vlm.py writes the test split as a question file and hands the rest to tokred sweep."""
    import torch

    sys.path.insert(0, str(REPO / "evals"))
    import sweep_vlm

    threads = torch.get_num_threads()
    try:
        assert sweep_vlm.main(["--per-family", "3", "--families", "describe", "cell", "--questions-dir",
                               str(tmp_path / "q"), "--reducers", "divprune,pool", "--keeps", "0.25", "--rounds", "1",
                               "--out", str(tmp_path), "--threads", str(threads), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / vs.JSON_NAME).read_text())
    assert [r["spec"] for r in report["results"]] == ["none", "divprune:keep=0.25", "pool:stride=2/stage=projector"]
    assert report["families"] == ["describe", "cell"] and report["questions"] == 6
    none = report["results"][0]["families"]
    assert none["describe"]["agreement"] == none["cell"]["agreement"] == 1.0  # last_word: the last words agree


def test_the_readme_question_file_example_reads(tmp_path):
    """The JSON Lines example of the README's "Measure accuracy on your own model" is a valid question file."""
    from PIL import Image

    text = (REPO / "README.md").read_text()
    section = text[text.index("### Measure accuracy on your own model"):]
    block = section[section.index("```json\n") + 8:]
    block = block[:block.index("```")]
    records = [json.loads(line) for line in block.splitlines()]
    for record in records:
        for name in [record.get("image")] + record.get("images", []) + record.get("frames", []):
            if name:
                (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4)).save(tmp_path / name)
    path = tmp_path / "q.jsonl"
    path.write_text(block)
    questions = vs.read_questions(path)
    assert [q.family for q in questions] == ["count", "attribute", "all", "all"]
    assert len(questions[2].frames) == 3 and questions[3].score == "last_word"
