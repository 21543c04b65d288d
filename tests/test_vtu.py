"""VTU (DyMU's virtual token unmerging in the language model): the re-merge plan against a brute-force
group mean; singleton groups == the unreduced loop bit for bit; real duplicates through one decoder
layer's attention and output projection == the group mean of the unpatched layer's; the virtual map
the adapters build against the vision and projector stages' own groups; cached == uncached
generation; batch == one by one; FLOPs (n-row linear parts, N-row attention core) == FlopCounterMode;
bad input."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokred
from helpers import IMAGE_TOKEN, QWEN_IMAGE, llava_inputs, next_step, qwen_inputs, tiny_llava, tiny_qwen2_vl
from tokred.decoder import CompatibilityError, LanguageModelEngine, MRoPE, Rotary1D, Sequence, Unmerged, additive_mask
from tokred.plan import take
from tokred.reducers.vtu import remerge_plan

LLAVA_PROMPTS = [([1, 2, 3], [4, 5, 6, 7, 8]), ([9], [10, 11])]  # the second is left-padded
QWEN_PROMPTS, QWEN_GRIDS = [([5, 6, 7], [8, 9, 10, 11]), ([12], [13, 14])], [[1, 8, 8], [1, 4, 4]]
QWEN_SUPPRESS = [2, QWEN_IMAGE, 91, 92, 93]

#: merging reducers VTU runs with, per family (DToMe in LLaVA-1.5's tower; pooling at the projector)
CASES = {
    "llava_dtome": ("llava", (tokred.DToMe(thresholds=0.2), tokred.VTU())),
    "llava_tome": ("llava", (tokred.ToMe(r=3), tokred.VTU())),
    "llava_pool": ("llava", (tokred.Pool(stride=2, stage="projector"), tokred.VTU())),
    "llava_dtome_divprune": ("llava", (tokred.DToMe(thresholds=0.2), tokred.DivPrune(keep=0.5), tokred.VTU())),
    "qwen_pool": ("qwen2_vl", (tokred.Pool(stride=2, stage="projector"), tokred.VTU())),
    "qwen_matryoshka": ("qwen2_vl", (tokred.Matryoshka(tokens=4), tokred.VTU())),
    "next_divprune": ("llava_next", (tokred.DivPrune(keep=0.5), tokred.VTU())),  # pruned: no virtual copy
}


@pytest.fixture(scope="module")
def models():
    return {"llava": tiny_llava("llava"), "llava_next": tiny_llava("llava_next"), "qwen2_vl": tiny_qwen2_vl("qwen2_vl")}


def inputs_of(kind, model, seed=0):
    if kind.startswith("llava"):
        return llava_inputs(model, LLAVA_PROMPTS, seed=seed)
    return qwen_inputs(QWEN_PROMPTS, QWEN_GRIDS, seed=seed)


def greedy_cached(kind, model, inputs, steps):
    suppress = [IMAGE_TOKEN] if kind.startswith("llava") else QWEN_SUPPRESS
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, suppress_tokens=suppress, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:]


def greedy_uncached(kind, model, inputs, steps):
    """Greedy decoding by re-running the model on the whole sequence at every step (no cache)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prompt_length = ids.shape[1]
    suppress = [IMAGE_TOKEN] if kind.startswith("llava") else QWEN_SUPPRESS
    for _ in range(steps):
        call = dict(inputs, input_ids=ids, attention_mask=mask)
        if kind == "qwen2_vl":
            call["mm_token_type_ids"] = (ids == QWEN_IMAGE).int()
        logits = model(**call, use_cache=False, prompt_length=prompt_length).logits[:, -1]
        logits[:, suppress] = -torch.inf
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, prompt_length:]


# the re-merge plan ---------------------------------------------------------------------------------

def test_remerge_plan_is_the_group_mean():
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor([[-1, -1, 0, 1, 1, 2, 1, 3, 2, 4],  # padding, a group of three, one of two
                         [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])  # singletons
    x = torch.randn(2, 10, 3, generator=generator, dtype=torch.float64)
    plan = remerge_plan(rows, 10)
    out, size = plan.weighted_mean(x, (rows >= 0)[..., None].double())
    assert torch.equal(plan.destinations(), rows)
    for b in range(2):
        for u in range(10):
            group = (rows[b] == u).nonzero().flatten()
            expected = x[b, group].mean(dim=0) if len(group) else torch.zeros(3, dtype=torch.float64)
            torch.testing.assert_close(out[b, u], expected, rtol=1e-12, atol=1e-12)
            assert size[b, u, 0] == len(group)
    assert torch.equal(out[1], x[1])  # singletons: untouched, bit for bit


# the engine on one language model: singletons and real duplicates ------------------------------------

def text_models():
    """Language models of every decoder VTU knows: Qwen2 (the tiny LLaVA's), Llama, Mistral, Qwen2-VL's and
    Qwen2.5-VL's."""
    from transformers import LlamaConfig, LlamaModel, MistralConfig, MistralModel

    shape = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    out = {"qwen2": tiny_llava("llava").model.language_model,
           "llama": LlamaModel(LlamaConfig(**shape, attn_implementation="sdpa")),
           "mistral": MistralModel(MistralConfig(**shape, sliding_window=None, attn_implementation="sdpa")),
           "qwen2_vl": tiny_qwen2_vl("qwen2_vl").model.language_model,
           "qwen2_5_vl": tiny_qwen2_vl("qwen2_5_vl").model.language_model}
    for model in out.values():
        with torch.no_grad():
            for module in model.modules():
                if "Norm" in type(module).__name__:
                    torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    return {name: model.eval() for name, model in out.items()}


TEXT_MODELS = text_models()


def prompt_sequence(model, name, length=14, dtype=torch.float32):
    """A left-padded batch of two prompts (the second 3 tokens shorter) as the engine takes it."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 90, (2, length), generator=generator)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :3] = False
    scheme = MRoPE() if name.startswith("qwen2_") else Rotary1D()
    index = torch.arange(length).expand(2, -1)
    positions = Rotary1D.prompt(valid, None)
    if name.startswith("qwen2_"):
        positions = positions[..., None].expand(-1, -1, 3).clone()
    embeds = model.embed_tokens(ids).to(dtype)
    seq = Sequence(embeds, positions, valid, torch.zeros_like(valid), valid, index + 1)
    return seq, scheme, scheme.next_position(positions, valid)


@pytest.mark.parametrize("name", list(TEXT_MODELS))
@torch.no_grad()
def test_singleton_groups_are_the_unreduced_loop_bit_for_bit(name):
    """Every virtual token its own row: VTU's layers == the same decoder layers run plainly, in the
    prefill and in decode steps (the cache holds the same keys and values)."""
    model = TEXT_MODELS[name]
    seq, scheme, next_position = prompt_sequence(model, name)
    plain, vtu = LanguageModelEngine(model, None, scheme), LanguageModelEngine(model, tokred.VTU(), scheme)
    rows = torch.where(seq.valid, torch.arange(seq.valid.shape[1]), -1)
    outputs = []
    for engine, unmerged in ((plain, None), (vtu, Unmerged(rows, seq.positions, next_position))):
        cache = engine.new_cache()
        run = engine.prefill(copy.copy(seq) if unmerged is None else Sequence(**{**seq.__dict__, "unmerged": unmerged}),
                             next_position, cache, keep_cache=True)
        step = model.embed_tokens(torch.tensor([[7], [8]]))
        mask = torch.cat([seq.valid.long(), torch.ones(2, 1, dtype=torch.long)], dim=1)
        outputs.append((run.hidden, engine.decode(run.segments, step, mask, cache)))
    assert torch.equal(outputs[0][0][seq.valid], outputs[1][0][seq.valid])  # padding rows: VTU gives them no copy
    assert torch.equal(outputs[0][1], outputs[1][1])


@pytest.mark.parametrize("name", list(TEXT_MODELS))
@torch.no_grad()
def test_real_duplicates_through_one_layer_equal_the_group_mean(name):
    """E = M e: the unpatched decoder layer's attention and output projection on the N rows of E (its
    MLP zeroed: a non-linear MLP of a group's mean is not the mean of its outputs), averaged over each
    group, == VTU's layer on the n rows of e (float64)."""
    model = copy.deepcopy(TEXT_MODELS[name]).double()
    model.layers = nn.ModuleList(model.layers[:1])
    model.norm = nn.Identity()
    layer = model.layers[0]
    nn.init.zeros_(layer.mlp.down_proj.weight)
    seq, scheme, next_position = prompt_sequence(model, name, length=12, dtype=torch.float64)
    # rows: 12 virtual tokens per sample onto 7 rows; groups of 3 and 2 that are not contiguous
    rows = torch.tensor([[0, 1, 2, 3, 2, 4, 3, 2, 5, 3, 6, 6], [-1, -1, -1, 0, 1, 2, 1, 3, 4, 1, 5, 6]])
    e = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    virtual = rows >= 0
    full = take(e, rows.clamp(min=0))  # E = M e
    cos_sin = model.rotary_emb(full, scheme.rotary(seq.positions))
    reference = layer(full, attention_mask=additive_mask(virtual, 12, torch.float64), position_ids=None,
                      position_embeddings=cos_sin, use_cache=False)
    reference = torch.stack([torch.stack([reference[b, rows[b] == u].mean(dim=0) for u in range(7)]) for b in range(2)])
    valid = torch.tensor([[True] * 7, [True] * 7])
    reduced = Sequence(e, seq.positions[:, :7], valid, valid, valid, torch.arange(1, 8).expand(2, -1),
                       unmerged=Unmerged(rows, seq.positions, next_position))
    engine = LanguageModelEngine(model, tokred.VTU(), scheme)
    out = engine.prefill(reduced, next_position, engine.new_cache(), keep_cache=False).hidden
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)


# the virtual map the adapters build ----------------------------------------------------------------------

class Recorder:
    """Records the sequences the engine's VTU prefill gets."""

    def __init__(self, monkeypatch):
        self.seen = []
        original = LanguageModelEngine._prefill_unmerged

        def record(engine, seq, cache, keep_cache):
            self.seen.append(seq)
            return original(engine, seq, cache, keep_cache)

        monkeypatch.setattr(LanguageModelEngine, "_prefill_unmerged", record)


def groups_of(rows, places):
    """The partition of ``places`` (positions of one image's placeholders) by the row each copies."""
    groups = {}
    for i, place in enumerate(places.tolist()):
        groups.setdefault(int(rows[place]), []).append(i)
    return sorted(groups.values())


@torch.no_grad()
def test_the_virtual_map_follows_the_tower_merges(models, monkeypatch):
    """Each placeholder copies the row of the tower token its patch merged into: the partition of an
    image's patches by row == DToMe's source groups at the tower's feature layer; text copies itself;
    the virtual positions are the unreduced prompt's."""
    model, recorder = models["llava"], Recorder(monkeypatch)
    inputs = inputs_of("llava", model)
    with tokred.applied(model, tokred.DToMe(thresholds=0.2), tokred.VTU()):
        model(**inputs)
        tower = tokred.api.adapter_of(model).vision_trace
    seq = recorder.seen[-1]
    feature_layer = model.config.vision_feature_layer % (model.config.vision_config.num_hidden_layers + 1)
    rows = torch.where(seq.unmerged.rows >= 0, seq.origin.gather(1, seq.unmerged.rows.clamp(min=0)) - 1, -1)
    for b in range(2):
        places = (inputs["input_ids"][b] == IMAGE_TOKEN).nonzero().flatten()
        tower_groups = sorted([p - 1 for p in group] for group in tower.sources(b, feature_layer - 1) if 0 not in group)
        assert groups_of(rows[b], places) == tower_groups and len(tower_groups) < 16
        text = inputs["attention_mask"][b].bool() & (inputs["input_ids"][b] != IMAGE_TOKEN)
        assert torch.equal(rows[b][text], text.nonzero().flatten())
        assert bool((rows[b][places] >= places[0]).all() & (rows[b][places] <= places[-1]).all())
    assert bool((seq.unmerged.rows[~inputs["attention_mask"].bool()] == -1).all())
    assert torch.equal(seq.unmerged.positions, (inputs["attention_mask"].cumsum(dim=1) - 1).clamp(min=0))


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
@torch.no_grad()
def test_the_virtual_map_follows_the_projector_pooling(models, monkeypatch, kind):
    """Pool(stride=2) at the projector: the partition of an image's placeholders by row == its 2 x 2 windows."""
    model, recorder = models[kind], Recorder(monkeypatch)
    inputs = inputs_of(kind, model)
    with tokred.applied(model, tokred.Pool(stride=2, stage="projector"), tokred.VTU()):
        model(**inputs)
    seq = recorder.seen[-1]
    rows = seq.origin.gather(1, seq.unmerged.rows.clamp(min=0)) - 1
    image = IMAGE_TOKEN if kind == "llava" else QWEN_IMAGE
    grids = [(4, 4)] * 2 if kind == "llava" else [(h // 2, w // 2) for _, h, w in QWEN_GRIDS]
    for b, (height, width) in enumerate(grids):
        places = (inputs["input_ids"][b] == image).nonzero().flatten()
        windows = {}
        for i in range(height * width):
            windows.setdefault((i // width // 2, i % width // 2), []).append(i)
        assert groups_of(rows[b], places) == sorted(windows.values())


# the model: identity, generation, batch, FLOPs, trace ---------------------------------------------------

@pytest.mark.parametrize("kind,reducers", [("llava", (tokred.DToMe(thresholds=float("inf")), tokred.VTU())),
                                           ("qwen2_vl", (tokred.Pool(stride=1, stage="projector"), tokred.VTU()))])
@torch.no_grad()
def test_nothing_merged_is_the_unpatched_model(models, kind, reducers):
    model = models[kind]
    inputs = inputs_of(kind, model)
    reference, tokens = model(**inputs).logits, greedy_cached(kind, model, inputs, 4)
    with tokred.applied(model, *reducers):
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(greedy_cached(kind, model, inputs, 4), tokens)


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_cached_generation_equals_uncached(models, case):
    kind, reducers = CASES[case]
    model = models[kind]
    inputs = inputs_of(kind, model)
    with tokred.applied(model, *reducers):
        cached = greedy_cached(kind, model, inputs, 5)
        assert torch.equal(cached, greedy_uncached(kind, model, inputs, 5))
        record = [r for r in tokred.last_trace(model).layers if r.stage == "llm"][-1]
        assert record.tokens_out < record.tokens_attention == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("case", ["llava_dtome", "qwen_pool"])
@torch.no_grad()
def test_batch_equals_one_by_one(models, case):
    kind, reducers = CASES[case]
    model = models[kind]
    batch = inputs_of(kind, model, seed=3)
    with tokred.applied(model, *reducers):
        logits, tokens = model(**batch).logits[:, -1], greedy_cached(kind, model, batch, 4)
        patches = 0
        for i in range(2):
            if kind == "llava":
                single = llava_inputs(model, [LLAVA_PROMPTS[i]])
                single["pixel_values"] = batch["pixel_values"][i:i + 1]
            else:
                single = qwen_inputs([QWEN_PROMPTS[i]], [QWEN_GRIDS[i]])
                count = torch.tensor(QWEN_GRIDS[i]).prod()
                single["pixel_values"] = batch["pixel_values"][patches:patches + count]
                patches += count
            torch.testing.assert_close(model(**single).logits[:, -1], logits[i:i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(greedy_cached(kind, model, single, 4), tokens[i:i + 1])


def counted(fn):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("case", ["llava_dtome", "qwen_pool"])
@torch.no_grad()
def test_flops_count_linear_parts_on_rows_and_attention_on_virtual_tokens(models, case):
    kind, reducers = CASES[case]
    model = models[kind]
    inputs = inputs_of(kind, model)
    with tokred.applied(model, *reducers):
        out = None

        def prefill():
            nonlocal out
            out = model(**inputs, use_cache=True)

        measured = counted(prefill)
        report = tokred.flops(model)
        token, mask = next_step(inputs, out)
        extra = {} if kind == "llava" else {"position_ids": torch.zeros(4, 2, 1, dtype=torch.long)}
        step = counted(lambda: model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values,
                                     use_cache=True, logits_to_keep=1, **extra))
        record = [r for r in tokred.last_trace(model).layers if r.stage == "llm"][0]
        costs = tokred.api.adapter_of(model).llm_costs(0)
    assert report.total == measured and report.decode_per_token == step
    rows, virtual = record.tokens_out, record.tokens_attention
    assert rows < virtual == inputs["input_ids"].shape[1]
    expected = 2 * (costs.per_attention_token * rows + costs.per_token_pair * virtual ** 2 + costs.per_mlp_token * rows)
    assert dict((part, flops) for _, part, flops in report.layers)["layer0"] == expected


# bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reducers,error,message", [
    ((tokred.VTU(),), ValueError, "'vision' or 'projector' stage"),
    ((tokred.DToMe(thresholds=0.2), tokred.VTU(), tokred.FastV(keep=0.5)), ValueError, "one reducer per stage"),
])
def test_bad_combinations_leave_the_model_untouched(models, reducers, error, message):
    model = models["llava"]
    inputs = inputs_of("llava", model)
    with torch.no_grad():
        reference = model(**inputs).logits
    with pytest.raises(error, match=message):
        tokred.apply(model, *reducers)
    assert tokred.reducers_of(model) == () and "forward" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


def test_an_unknown_decoder_layer_is_a_compatibility_error(models):
    model = copy.deepcopy(models["llava"])
    layer = model.model.language_model.layers[1]
    layer.__class__ = type("PatchedQwen2DecoderLayer", (type(layer),), {})
    with pytest.raises(CompatibilityError, match=r"PatchedQwen2DecoderLayer.*installed: transformers \d"):
        tokred.apply(model, tokred.DToMe(thresholds=0.2), tokred.VTU())
    assert tokred.reducers_of(model) == () and "forward" not in model.__dict__


def test_vtu_is_registered():
    assert str(tokred.VTU()) == "vtu"
    assert tokred.parse_spec("dtome:thresholds=0.5+vtu") == (tokred.DToMe(thresholds=0.5), tokred.VTU())
    assert tokred.reducer("vtu") == tokred.VTU()
