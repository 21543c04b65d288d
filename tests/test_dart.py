"""DART: its rule against a hand-worked case and a brute-force version, the llm-stage invariants
(text and padding kept, exactly k visual tokens, per-sample and prompt-only decisions), bad input."""
import math

import pytest
import torch

from tokred.reducers.dart import DART, budget, select, select_flops
from tokred.signals import SequenceSignal

# ---------------------------------------------------------------------------------------------
# a hand-worked sample: positions 0 (system text), 1-6 (visual), 7-8 (text after the image)
#   key L1 norm:  t0=100 (before the image: never a pivot), v1..v6 = 1 5 2 3 1 1, t7=2, t8=7
#   hidden (2-D): v1=(1,0) v2=(1,0) v3=(0,1) v4=(-1,0) v5=(1,1) v6=(-1,1), t8=(0,1)
# image pivot: v2 (norm 5); text pivot: t8 (norm 7 > 2); pool v1 v3 v4 v5 v6.
# cos to v2:  v1 1, v3 0, v4 -1, v5 .71, v6 -.71
# cos to t8:  v1 0, v3 1, v4  0, v5 .71, v6  .71
NORM = [100.0, 1, 5, 2, 3, 1, 1, 2, 7]
HIDDEN = [[3.0, 1], [1, 0], [1, 0], [0, 1], [-1, 0], [1, 1], [-1, 1], [1, 0], [0, 1]]
VISUAL = [False] + [True] * 6 + [False, False]


def _hand_sample():
    visual = torch.tensor(VISUAL)
    text = torch.tensor([False] * 7 + [True, True])
    return torch.tensor(HIDDEN), torch.tensor(NORM), visual, text


def test_hand_worked_case():
    hidden, norm, visual, text = _hand_sample()
    # k=5: budget 4 over 2 pivots -> 2 each. v2 first takes v4 (-1), v6 (-.71); then t8 takes the
    # least similar of v1 (0), v3 (1), v5 (.71): v1, v5. v3 duplicates t8 and goes.
    assert select(hidden, norm, visual, text, 5, image_pivots=1, text_pivots=1).tolist() == [1, 2, 4, 5, 6]
    # k=4: budget 3 -> the image pivot (first in order) takes 2, the text pivot 1: v4, v6, then v1.
    assert select(hidden, norm, visual, text, 4, image_pivots=1, text_pivots=1).tolist() == [1, 2, 4, 6]
    # k at most the image pivots: the k largest key norms, no picks: v2 (5), v4 (3).
    assert select(hidden, norm, visual, text, 2, image_pivots=4, text_pivots=4).tolist() == [2, 4]
    assert select(hidden, norm, visual, text, 1, image_pivots=1, text_pivots=1).tolist() == [2]
    # text pivot only: no image pivot, so v2 is in the pool too; budget 4 all to t8: v1, v2, v4 at 0,
    # then v5 and v6 tie at .71 -> the lower position, v5.
    assert select(hidden, norm, visual, text, 4, image_pivots=0, text_pivots=1).tolist() == [1, 2, 4, 5]
    # no text after the image and no image pivot asked: the largest key norm (v2) is the one pivot,
    # the other 2 picks are v4 (-1) and v6 (-.71).
    no_text = torch.zeros(9, dtype=torch.bool)
    assert select(hidden, norm, visual, no_text, 3, image_pivots=0, text_pivots=4).tolist() == [2, 4, 6]


def test_budget_split():
    assert budget(576, 40, 128, 4, 4) == (4, 4, [16, 16, 16, 16, 15, 15, 15, 15])
    assert budget(576, 2, 64, 4, 4) == (4, 2, [10, 10, 10, 10, 10, 10])
    assert budget(10, 5, 3, 4, 4) == (3, 4, [0] * 7)
    assert budget(10, 0, 3, 0, 4) == (1, 0, [2])
    for n, t, k, i, p in [(50, 3, 17, 4, 4), (9, 0, 9, 2, 3), (30, 8, 5, 0, 2), (12, 1, 12, 4, 4)]:
        pivots_image, _, quotas = budget(n, t, k, i, p)
        assert pivots_image + sum(quotas) == k


# ---------------------------------------------------------------------------------------------
def brute_force_select(hidden, norm, visual, text, k, image_pivots, text_pivots):
    """The rule for one sample written out with Python loops over tokens."""
    hidden, norm = hidden.double().tolist(), norm.double().tolist()
    vis = [i for i, v in enumerate(visual.tolist()) if v]
    txt = [i for i, t in enumerate(text.tolist()) if t]

    def by_norm(positions):
        return sorted(positions, key=lambda i: (-norm[i], i))

    def cos(a, b):
        dot = sum(x * y for x, y in zip(hidden[a], hidden[b]))
        return dot / (math.sqrt(sum(x * x for x in hidden[a])) * math.sqrt(sum(y * y for y in hidden[b])))

    n_text = min(text_pivots, len(txt))
    n_image = min(image_pivots if image_pivots or n_text else 1, k)
    image = by_norm(vis)[:n_image]
    pivots = image + by_norm(txt)[:n_text]
    kept = list(image)
    pool = [i for i in vis if i not in image]
    remaining = k - n_image
    for step, pivot in enumerate(pivots):
        quota = remaining // len(pivots) + (1 if step < remaining % len(pivots) else 0)
        chosen = sorted(pool, key=lambda i: (cos(pivot, i), i))[:quota]
        kept += chosen
        pool = [i for i in pool if i not in chosen]
    return sorted(kept)


@pytest.mark.parametrize("k,image_pivots,text_pivots", [
    (1, 4, 4), (4, 4, 4), (5, 4, 4), (13, 4, 4), (30, 4, 4), (40, 4, 4), (17, 2, 6), (9, 0, 3), (11, 3, 0),
    (25, 8, 8), (23, 1, 1)])
def test_selection_equals_brute_force(k, image_pivots, text_pivots):
    torch.manual_seed(100 * k + 10 * image_pivots + text_pivots)
    length = 60
    for trial in range(3):
        hidden = torch.randn(length, 6)
        norm = torch.rand(length) * 10
        start = 5 + trial
        visual = torch.zeros(length, dtype=torch.bool)
        visual[start:start + 40] = True
        text = torch.zeros(length, dtype=torch.bool)
        text[start + 40:start + 40 + 2 * trial + 1] = True  # 1, 3 or 5 text tokens: fewer than asked, sometimes
        got = select(hidden, norm, visual, text, k, image_pivots, text_pivots)
        assert got.dtype == torch.long and got.shape == (k,)
        assert got.tolist() == brute_force_select(hidden, norm, visual, text, k, image_pivots, text_pivots)


def test_ties_go_to_the_lower_position():
    # every visual token identical and with equal key norms: the pivot is the first visual token,
    # the picks the next ones in order
    hidden = torch.ones(10, 3)
    norm = torch.ones(10)
    visual = torch.tensor([False] + [True] * 8 + [False])
    text = torch.tensor([False] * 9 + [True])
    assert select(hidden, norm, visual, text, 4, image_pivots=1, text_pivots=1).tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
def _keys_with_norm(norm, heads=2, dim=3):
    """(heads, L, dim) keys of mixed sign whose L1 norm over heads and dims is ``norm``."""
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(heads, norm.shape[0], dim, generator=generator, dtype=torch.float64)
    return (raw / raw.abs().sum(dim=(0, 2))[None, :, None] * norm[None, :, None]).float()


def _signal(samples, channels=6):
    """Left-padded batch of samples given as (prompt_length, visual slice, generated count, seed)."""
    lengths = [p + g for p, _, g, _ in samples]
    width = max(lengths) + 1  # at least one padding token everywhere
    batch = len(samples)
    hidden = torch.randn(batch, width, channels)
    keys = torch.randn(batch, 2, width, 3)
    visual = torch.zeros(batch, width, dtype=torch.bool)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    prompt = torch.zeros(batch, width, dtype=torch.bool)
    for b, (prompt_length, image, generated, seed) in enumerate(samples):
        pad = width - prompt_length - generated
        generator = torch.Generator().manual_seed(seed)
        hidden[b, pad:] = torch.randn(prompt_length + generated, channels, generator=generator)
        keys[b, :, pad:] = torch.randn(2, prompt_length + generated, 3, generator=generator)
        visual[b, pad + image.start:pad + image.stop] = True
        valid[b, pad:] = True
        prompt[b, pad:pad + prompt_length] = True
    return SequenceSignal(hidden=hidden, visual=visual, valid=valid, prompt=prompt, keys=keys)


SAMPLES = [(30, slice(3, 23), 0, 1), (40, slice(2, 32), 4, 2), (25, slice(5, 21), 2, 3)]


def _shifted(signal, b):
    """Sample b alone, without padding."""
    rows = signal.valid[b]
    return SequenceSignal(hidden=signal.hidden[b:b + 1, rows], visual=signal.visual[b:b + 1, rows],
                          valid=signal.valid[b:b + 1, rows], prompt=signal.prompt[b:b + 1, rows],
                          keys=signal.keys[b:b + 1, :, rows])


@pytest.mark.parametrize("keep", [0.25, 0.5, 7, 1.0])
def test_keep_mask_invariants(keep):
    torch.manual_seed(0)
    signal = _signal(SAMPLES)
    reducer = DART(keep=keep)
    mask = reducer.keep_mask(signal)
    assert mask.dtype == torch.bool and mask.shape == signal.visual.shape
    assert mask[~signal.visual].all()  # text, generated tokens and padding stay
    for b, (_, image, _, _) in enumerate(SAMPLES):
        n = image.stop - image.start
        want = keep if isinstance(keep, int) else max(1, round(keep * n))
        assert int((mask[b] & signal.visual[b]).sum()) == want
        alone = reducer.keep_mask(_shifted(signal, b))
        assert torch.equal(alone[0], mask[b, signal.valid[b]])  # no dependence on batch mates or padding
    if keep == 1.0:
        assert mask.all()


def test_keep_mask_equals_select_on_the_hand_worked_case():
    # the hand-worked sample behind two padding tokens, with keys whose L1 norm is NORM
    norm = torch.tensor(NORM)
    keys = torch.cat([torch.full((2, 2, 3), 50.0), _keys_with_norm(norm)], dim=1)[None]
    hidden = torch.cat([torch.full((2, 2), 9.0), torch.tensor(HIDDEN)])[None]
    visual = torch.tensor([[False, False] + VISUAL])
    valid = torch.tensor([[False, False] + [True] * 9])
    signal = SequenceSignal(hidden=hidden, visual=visual, valid=valid, prompt=valid.clone(), keys=keys)
    mask = DART(keep=5, image_pivots=1, text_pivots=1).keep_mask(signal)
    assert mask[0].nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]  # v3 (position 5) goes
    # t7 (norm 2) as the last prompt token, t8 generated: t7 is now the text pivot. cos to t7=(1,0):
    # after v2 took v4, v6, the least similar of v1 (1), v3 (0), v5 (.71) are v3 and v5
    generated = signal.prompt.clone()
    generated[0, -1] = False
    signal = SequenceSignal(hidden=hidden, visual=visual, valid=valid, prompt=generated, keys=keys)
    mask = DART(keep=5, image_pivots=1, text_pivots=1).keep_mask(signal)
    assert (mask[0] & visual[0]).nonzero().squeeze(1).tolist() == [4, 5, 6, 7, 8]  # v1 (position 3) goes


def test_decisions_use_the_prompt_only():
    torch.manual_seed(1)
    signal = _signal(SAMPLES)
    reducer = DART(keep=0.3)
    mask = reducer.keep_mask(signal)
    outside = ~signal.prompt
    hidden, keys = signal.hidden.clone(), signal.keys.clone()
    hidden[outside] = torch.randn(int(outside.sum()), hidden.shape[-1]) * 100
    keys.transpose(1, 2)[outside] = torch.randn(int(outside.sum()), keys.shape[1], keys.shape[-1]) * 100
    changed = SequenceSignal(hidden=hidden, visual=signal.visual, valid=signal.valid, prompt=signal.prompt, keys=keys)
    assert torch.equal(reducer.keep_mask(changed), mask)
    # ... while the prompt's text after the image does matter (a sanity check of the test itself)
    text = signal.prompt & ~signal.visual
    hidden = signal.hidden.clone()
    hidden[text] = torch.randn(int(text.sum()), hidden.shape[-1]) * 100
    keys = signal.keys.clone()
    keys.transpose(1, 2)[text] = torch.randn(int(text.sum()), keys.shape[1], keys.shape[-1]) * 100
    changed = SequenceSignal(hidden=hidden, visual=signal.visual, valid=signal.valid, prompt=signal.prompt, keys=keys)
    assert not torch.equal(reducer.keep_mask(changed), mask)


def test_permuting_visual_tokens_permutes_the_choice():
    torch.manual_seed(2)
    signal = _signal(SAMPLES[:1])
    reducer = DART(keep=0.4)
    kept = set(reducer.keep_mask(signal)[0].nonzero().squeeze(1).tolist())
    positions = signal.visual[0].nonzero().squeeze(1)
    shuffled = positions[torch.randperm(len(positions))]
    hidden, keys = signal.hidden.clone(), signal.keys.clone()
    hidden[0, positions] = signal.hidden[0, shuffled]
    keys[0, :, positions] = signal.keys[0, :, shuffled]
    moved = SequenceSignal(hidden=hidden, visual=signal.visual, valid=signal.valid, prompt=signal.prompt, keys=keys)
    new_position = dict(zip(shuffled.tolist(), positions.tolist()))
    want = {new_position.get(i, i) for i in kept}
    assert set(reducer.keep_mask(moved)[0].nonzero().squeeze(1).tolist()) == want


def test_samples_without_visual_tokens_are_untouched():
    signal = _signal([(20, slice(0, 0), 0, 4), (30, slice(2, 22), 0, 5)])
    mask = DART(keep=3).keep_mask(signal)
    assert mask[0].all() and int((mask[1] & signal.visual[1]).sum()) == 3


def test_overhead_flops():
    signal = _signal(SAMPLES)  # visual 20, 30, 16; text after the image 7, 8, 4; 6 channels
    reducer = DART(keep=0.5)
    want = 2 * 6 * (8 * 16 + 8 * 26 + 8 * 12)  # 4 + 4 pivots against the visual tokens that are not pivots
    assert reducer.overhead_flops(signal) == want
    assert select_flops(20, 7, 3, 6) == 0  # k <= image pivots: no matmul
    assert DART(keep=2, image_pivots=4).overhead_flops(signal) == 0


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0, 0.0, 1.5, -1, True, "a", None])
def test_bad_keep(keep):
    with pytest.raises(ValueError, match="keep must be a fraction in \\(0, 1\\]"):
        DART(keep=keep)


@pytest.mark.parametrize("layer", [0, -1, True, 1.5])
def test_bad_layer(layer):
    with pytest.raises(ValueError, match="layer must be an int >= 1"):
        DART(keep=0.5, layer=layer)


@pytest.mark.parametrize("layer,depth", [(2, 2), (5, 4), (1, 1)])
def test_layer_beyond_the_model(layer, depth):
    with pytest.raises(ValueError, match=f"layer={layer}, but the language model has {depth} decoder layers"):
        DART(keep=0.5, layer=layer).check(depth)
    DART(keep=0.5, layer=1).check(2)


def test_bad_positions():
    with pytest.raises(ValueError, match="positions must be one of"):
        DART(keep=0.5, positions="gaps")


@pytest.mark.parametrize("name,value", [("image_pivots", -1), ("text_pivots", True), ("image_pivots", 1.5),
                                        ("text_pivots", None)])
def test_bad_pivots(name, value):
    with pytest.raises(ValueError, match=f"{name} must be an int >= 0"):
        DART(keep=0.5, **{name: value})


def test_no_pivots():
    with pytest.raises(ValueError, match="both 0.*at least one pivot"):
        DART(keep=0.5, image_pivots=0, text_pivots=0)


def test_count_larger_than_the_visual_tokens():
    signal = _signal(SAMPLES)  # 20, 30 and 16 visual tokens
    with pytest.raises(ValueError, match="keep=17 tokens, but there are only 16"):
        DART(keep=17).keep_mask(signal)


def test_missing_keys():
    signal = _signal(SAMPLES)
    signal.keys = None
    with pytest.raises(ValueError, match="DART needs the keys"):
        DART(keep=0.5).keep_mask(signal)


@pytest.mark.parametrize("k", [0, 7, 2.0, True])
def test_select_bad_k(k):
    hidden, norm, visual, text = _hand_sample()
    with pytest.raises(ValueError, match="k must be an int in \\[1, 6\\]"):
        select(hidden, norm, visual, text, k)


def test_select_bad_masks():
    hidden, norm, visual, text = _hand_sample()
    with pytest.raises(ValueError, match="both visual and a text"):
        select(hidden, norm, visual, visual, 2)
    with pytest.raises(ValueError, match="bool masks"):
        select(hidden, norm, visual.long(), text, 2)
    with pytest.raises(ValueError, match="expected hidden"):
        select(hidden, norm[:-1], visual, text, 2)


def test_key_norm_is_l1_over_heads_and_dims():
    # four visual tokens; keys (1 sample, 2 heads, 4 tokens, 3 dims). L1 norms: 6, 5, 6.6, 0.6;
    # squared L2: 6, 25, 7.26, .06; signed sums: 6, 5, -6.6, .6. Only the L1 norm picks token 2.
    keys = torch.zeros(1, 2, 4, 3)
    keys[0, :, 0] = 1.0
    keys[0, 1, 1, 2] = 5.0
    keys[0, :, 2] = -1.1
    keys[0, :, 3] = 0.1
    everything = torch.ones(1, 4, dtype=torch.bool)
    signal = SequenceSignal(hidden=torch.randn(1, 4, 5), visual=everything, valid=everything, prompt=everything,
                            keys=keys)
    assert DART(keep=1, image_pivots=1, text_pivots=0).keep_mask(signal).tolist() == [[False, False, True, False]]
