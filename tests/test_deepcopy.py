"""``copy.deepcopy`` of a patched vision model is an independent patched model: it runs its own
weights through its own adapter and records its own trace (the README promises it). ``torch.save`` /
``torch.load`` of a patched model gives the same patched model, in this process or a new one."""
import copy
import subprocess
import sys

import pytest
import torch

import tokred
from helpers import llava_inputs, tiny_llava
from test_all_adapters import MODELS


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_deepcopy_runs_the_copy(name, images):
    build, run, _ = MODELS[name]
    model = build()
    tokred.apply(model, tokred.ToMe(r=6))
    expected = run(model, images)
    clone = copy.deepcopy(model)
    for parameter in clone.parameters():
        parameter.zero_()
    assert not torch.equal(run(clone, images), expected)
    assert torch.equal(run(model, images), expected)  # the original is untouched by the copy
    assert tokred.last_trace(clone).tokens()[-1] < tokred.last_trace(clone).layers[0].tokens_in
    assert tokred.reducers_of(clone) == tokred.reducers_of(model)
    tokred.remove(clone)  # removing the copy's patch leaves the original patched
    assert tokred.reducers_of(clone) == () and tokred.reducers_of(model) == (tokred.ToMe(r=6),)
    assert torch.equal(run(model, images), expected)


def _assert_same_patched_model(loaded, model, run, inputs, build):
    """``loaded`` runs like ``model`` (output, reducers, trace) and ``remove`` gives the unpatched classes."""
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), run(model, inputs))
    assert tokred.reducers_of(loaded) == tokred.reducers_of(model)
    assert tokred.last_trace(loaded).tokens() == tokred.last_trace(model).tokens()
    tokred.remove(loaded)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in build().modules()]


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_save_and_load_of_a_patched_model(name, images, tmp_path):
    build, run, _ = MODELS[name]
    model = tokred.apply(build(), tokred.ToMe(r=6))
    torch.save(model, tmp_path / "model.pt")  # before any forward: transformers' output hooks do not pickle
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    _assert_same_patched_model(loaded, model, run, images, build)


@pytest.mark.parametrize("reducer", [tokred.ToMe(r=2), tokred.FastV(keep=0.5, layer=2)], ids=str)
def test_torch_save_and_load_of_a_patched_llava(reducer, tmp_path):
    model = tokred.apply(tiny_llava(), reducer)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    inputs = llava_inputs(model, [([1, 2, 3], [4, 5, 6, 7, 8]), ([9], [10, 11])])
    with torch.no_grad():
        assert torch.equal(loaded.generate(**inputs, max_new_tokens=3, do_sample=False),
                           model.generate(**inputs, max_new_tokens=3, do_sample=False))
    _assert_same_patched_model(loaded, model, lambda m, x: m(**x).logits, inputs, tiny_llava)


def test_a_patched_model_loads_in_a_new_process(images, tmp_path):
    """The patched classes are built at run time: a new interpreter rebuilds them from the pickle."""
    build, run, _ = MODELS["timm"]
    model = tokred.apply(build(), tokred.ToMe(r=6))
    torch.save(model, tmp_path / "model.pt")
    with torch.no_grad():
        torch.save((images, run(model, images)), tmp_path / "expected.pt")
    code = ("import torch, tokred\n"
            "model = torch.load('model.pt', weights_only=False)\n"
            "images, expected = torch.load('expected.pt')\n"
            "with torch.no_grad():\n"
            "    assert torch.equal(model(images), expected)\n"
            "assert tokred.reducers_of(model) == (tokred.ToMe(r=6),)\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=300)
