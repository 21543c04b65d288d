"""``copy.deepcopy`` of a patched vision model is an independent patched model: it runs its own
weights through its own adapter and records its own trace (the README promises it)."""
import copy

import pytest
import torch

import tokred
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
