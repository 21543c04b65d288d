"""FastV: top-k visual tokens by the last prompt token's attention, against a brute-force sort;
the llm-stage invariants; bad input."""
import pytest
import torch

from tokred.reducers.fastv import FastV, select
from tokred.signals import SequenceSignal


def brute_force_select(attention, visual, k):
    scores = attention.tolist()
    candidates = [i for i, v in enumerate(visual.tolist()) if v]
    return sorted(sorted(candidates, key=lambda i: (-scores[i], i))[:k])


@pytest.mark.parametrize("k", [1, 5, 17, 40])
def test_selection_equals_brute_force(k):
    torch.manual_seed(k)
    for trial in range(3):
        attention = torch.rand(60).softmax(0)
        visual = torch.zeros(60, dtype=torch.bool)
        visual[3 + trial:43 + trial] = True
        got = select(attention, visual, k)
        assert got.dtype == torch.long and got.shape == (k,)
        assert got.tolist() == brute_force_select(attention, visual, k)


def test_hand_worked_case_with_ties():
    # the text tokens (0, 6) get the most attention but are not candidates; visual 1-5 get
    # .1 .3 .3 .05 .3: the three .3 tie, so k=2 keeps the two lowest positions, 2 and 3
    attention = torch.tensor([.5, .1, .3, .3, .05, .3, .9])
    visual = torch.tensor([False, True, True, True, True, True, False])
    assert select(attention, visual, 2).tolist() == [2, 3]
    assert select(attention, visual, 4).tolist() == [1, 2, 3, 5]
    assert select(attention, visual, 5).tolist() == [1, 2, 3, 4, 5]


def _signal(samples):
    """Left-padded batch of samples given as (prompt length, visual slice, generated count, seed)."""
    width = max(p + g for p, _, g, _ in samples) + 1
    batch = len(samples)
    attention = torch.rand(batch, width)
    visual = torch.zeros(batch, width, dtype=torch.bool)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    prompt = torch.zeros(batch, width, dtype=torch.bool)
    for b, (prompt_length, image, generated, seed) in enumerate(samples):
        pad = width - prompt_length - generated
        attention[b, pad:] = torch.rand(prompt_length + generated, generator=torch.Generator().manual_seed(seed))
        visual[b, pad + image.start:pad + image.stop] = True
        valid[b, pad:] = True
        prompt[b, pad:pad + prompt_length] = True
    return SequenceSignal(hidden=torch.randn(batch, width, 4), visual=visual, valid=valid, prompt=prompt,
                          last_attention=attention)


SAMPLES = [(30, slice(3, 23), 0, 1), (40, slice(2, 32), 4, 2), (25, slice(5, 21), 2, 3)]


@pytest.mark.parametrize("keep", [0.25, 0.5, 7, 1.0])
def test_keep_mask_invariants(keep):
    torch.manual_seed(0)
    signal = _signal(SAMPLES)
    reducer = FastV(keep=keep)
    mask = reducer.keep_mask(signal)
    assert mask.dtype == torch.bool and mask.shape == signal.visual.shape
    assert mask[~signal.visual].all()
    for b, (_, image, _, _) in enumerate(SAMPLES):
        n = image.stop - image.start
        want_count = keep if isinstance(keep, int) else max(1, round(keep * n))
        kept = (mask[b] & signal.visual[b]).nonzero().squeeze(1).tolist()
        assert kept == brute_force_select(signal.last_attention[b], signal.visual[b], want_count)
        rows = signal.valid[b]
        alone = SequenceSignal(hidden=signal.hidden[b:b + 1, rows], visual=signal.visual[b:b + 1, rows],
                               valid=signal.valid[b:b + 1, rows], prompt=signal.prompt[b:b + 1, rows],
                               last_attention=signal.last_attention[b:b + 1, rows])
        assert torch.equal(reducer.keep_mask(alone)[0], mask[b, rows])
    if keep == 1.0:
        assert mask.all()
    assert reducer.overhead_flops(signal) == 0


def test_only_the_visual_scores_matter():
    torch.manual_seed(1)
    signal = _signal(SAMPLES)
    reducer = FastV(keep=0.3)
    mask = reducer.keep_mask(signal)
    attention = signal.last_attention.clone()
    attention[~signal.visual] = torch.rand(int((~signal.visual).sum())) * 10
    hidden = torch.randn_like(signal.hidden)
    changed = SequenceSignal(hidden=hidden, visual=signal.visual, valid=signal.valid, prompt=signal.prompt,
                             last_attention=attention)
    assert torch.equal(reducer.keep_mask(changed), mask)


def test_samples_without_visual_tokens_are_untouched():
    signal = _signal([(20, slice(0, 0), 0, 4), (30, slice(2, 22), 0, 5)])
    mask = FastV(keep=3).keep_mask(signal)
    assert mask[0].all() and int((mask[1] & signal.visual[1]).sum()) == 3


@pytest.mark.parametrize("keep", [0, 0.0, 1.5, -1, True, "a", None])
def test_bad_keep(keep):
    with pytest.raises(ValueError, match="keep must be a fraction in \\(0, 1\\]"):
        FastV(keep=keep)


@pytest.mark.parametrize("layer", [0, -1, True, 1.5])
def test_bad_layer(layer):
    with pytest.raises(ValueError, match="layer must be an int >= 1"):
        FastV(keep=0.5, layer=layer)


@pytest.mark.parametrize("layer,depth", [(2, 2), (5, 4), (1, 1)])
def test_layer_beyond_the_model(layer, depth):
    with pytest.raises(ValueError, match=f"FastV layer={layer}, but the language model has {depth} decoder layers"):
        FastV(keep=0.5, layer=layer).check(depth)
    FastV(keep=0.5, layer=3).check(4)


def test_bad_positions():
    with pytest.raises(ValueError, match="positions must be one of"):
        FastV(keep=0.5, positions="gaps")


def test_count_larger_than_the_visual_tokens():
    with pytest.raises(ValueError, match="keep=21 tokens, but there are only 20"):
        FastV(keep=21).keep_mask(_signal(SAMPLES))


def test_missing_attention():
    signal = _signal(SAMPLES)
    signal.last_attention = None
    with pytest.raises(ValueError, match="FastV needs the last prompt token's attention"):
        FastV(keep=0.5).keep_mask(signal)


@pytest.mark.parametrize("k", [0, 6, 2.0, True])
def test_select_bad_k(k):
    visual = torch.tensor([False, True, True, True, True, True, False])
    with pytest.raises(ValueError, match="k must be an int in \\[1, 5\\]"):
        select(torch.rand(7), visual, k)


def test_select_bad_shapes():
    with pytest.raises(ValueError, match="expected attention"):
        select(torch.rand(7), torch.ones(6, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="expected attention"):
        select(torch.rand(7), torch.ones(7), 2)
