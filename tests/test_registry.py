"""The reducer registry: names, ``tokred.reducer``, the text spec and ``str(reducer)``, third-party reducers."""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

import tokred
from tokred import registry
from tokred.reducers import Reducer
from tokred.reducers.adjacent import AdjacentMerge


@pytest.fixture
def clean_registry(monkeypatch):
    """A private copy of the registry, so a test's registrations and entry points do not leak."""
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_names", dict(registry._names))
    monkeypatch.setattr(registry, "_broken", {})
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [])


def test_builtin_names():
    assert tokred.list_reducers() == ["adjacent", "atp", "dart", "divprune", "dtome", "dycoke", "fastv", "holitom",
                                      "holitom_inner", "matryoshka", "pitome", "pool", "random", "thresholds", "tome",
                                      "uniform", "visionzip", "vtu"]
    for name in tokred.list_reducers():
        assert registry.name_of(registry.reducer_class(name)) == name


def test_reducer_by_name():
    assert tokred.reducer("dart", layer=2, keep=0.25) == tokred.DART(keep=0.25, layer=2)
    assert tokred.reducer("tome") == tokred.ToMe()
    assert tokred.reducer("TOME", r=4) == tokred.ToMe(r=4)
    with pytest.raises(ValueError, match=r"unknown reducer 'tomee' \(did you mean 'tome'\?\); known reducers: adjacent, "
                                         r"atp, dart, divprune, .*tome"):
        tokred.reducer("tomee", r=4)
    with pytest.raises(ValueError, match="unknown parameter 'ratio' for reducer 'tome'; its parameters are: r, "
                                         "prop_attn"):
        tokred.reducer("tome", ratio=0.5)
    with pytest.raises(ValueError, match="reducer 'dart' needs keep"):
        tokred.reducer("dart", layer=2)
    with pytest.raises(ValueError, match="keep must be"):  # the reducer's own check
        tokred.reducer("divprune", keep=0)


# round trips --------------------------------------------------------------------------------
ROUND_TRIPS = [
    # (reducer, its spec)
    (tokred.ToMe(), "tome"),
    (tokred.ToMe(r=16), "tome:r=16"),
    (tokred.ToMe(r=(16, -0.5)), "tome:r=16;-0.5"),
    (tokred.ToMe(r=(8, 0)), "tome:r=8;0"),
    (tokred.ToMe(r=[8, 8, 4], prop_attn=False), "tome:r=8;8;4/prop_attn=false"),
    (tokred.ToMe(r=[4, 2]), "tome:r=[4;2]"),
    (tokred.ToMe(r=[4]), "tome:r=[4]"),
    (tokred.PiToMe(keep=0.8, margin=[0.5, 0.4, 0.3]), "pitome:keep=0.8/margin=0.5;0.4;0.3"),
    (tokred.PiToMe(margin=0.25, protect_low_energy=True), "pitome:margin=0.25/protect_low_energy=true"),
    (tokred.PiToMe(margin=1), "pitome:margin=1"),
    (tokred.Thresholds(merge=[0.9, 0.8, 0.7], prune=0.5), "thresholds:merge=0.9;0.8;0.7/prune=0.5"),
    (tokred.Thresholds(merge=1e20, temperature=0.05), "thresholds:merge=1e20/temperature=0.05"),
    (tokred.Random(keep=0.3, stage="projector", positions="keep"), "random:keep=0.3/stage=projector/positions=keep"),
    (tokred.Random(layer=1, seed=7), "random:layer=1/seed=7"),
    (tokred.Pool(stride=(1, 2)), "pool:stride=1;2"),
    (tokred.Pool(stride=4, stage="projector"), "pool:stride=4/stage=projector"),
    (tokred.DivPrune(keep=0.25), "divprune:keep=0.25"),
    (tokred.DivPrune(keep=64, positions="keep"), "divprune:keep=64/positions=keep"),
    (tokred.DART(keep=0.5, layer=3), "dart:keep=0.5/layer=3"),
    (tokred.DART(keep=1), "dart:keep=1"),
    (tokred.DART(keep=1.0, image_pivots=2, text_pivots=0), "dart:keep=1.0/image_pivots=2/text_pivots=0"),
    (tokred.FastV(keep=0.25, positions="renumber"), "fastv:keep=0.25/positions=renumber"),
    (tokred.FastV(keep=128, layer=5), "fastv:keep=128/layer=5"),
    (AdjacentMerge(keep=0.25), "adjacent:keep=0.25"),
    (AdjacentMerge(keep=5, layer=1, prop_attn=False, positions="renumber"),
     "adjacent:keep=5/layer=1/prop_attn=false/positions=renumber"),
    (tokred.DToMe(thresholds=(0.5, 0.25, float("inf"))), "dtome:thresholds=(0.5;0.25;inf)"),
    (tokred.DToMe(thresholds=0.75, prop_attn=False), "dtome:thresholds=0.75/prop_attn=false"),
    (tokred.Matryoshka(tokens=36, positions="keep"), "matryoshka:tokens=36/positions=keep"),
    (tokred.VTU(), "vtu"),
    (tokred.VisionZip(dominant=4, contextual=0.125), "visionzip:dominant=4/contextual=0.125"),
    (tokred.DyCoke(keep=0.5, window=2), "dycoke:keep=0.5/window=2"),
    (tokred.Uniform(keep=5), "uniform:keep=5"),
    (tokred.Random(keep=0.25, stage="projector", per_frame=True), "random:keep=0.25/stage=projector/per_frame=true"),
    (tokred.Pool(stage="projector", temporal_stride=2), "pool:stage=projector/temporal_stride=2"),
    (tokred.HoliTom(retain=0.25, tau=0.8), "holitom:retain=0.25/tau=0.8"),
    (tokred.HoliTomInner(keep=0.5, layer=2), "holitom_inner:layer=2"),
    (tokred.ATP(), "atp"),
    (tokred.ATP(layers=(1, 3), thresholds=(0.5, float("-inf")), strides=4), "atp:layers=1;3/thresholds=0.5;-inf/strides=4"),
]


@pytest.mark.parametrize("reducer, spec", ROUND_TRIPS, ids=[spec for _, spec in ROUND_TRIPS])
def test_round_trip(reducer, spec):
    assert str(reducer) == spec
    parsed = tokred.parse_spec(spec)
    assert parsed == (reducer,)
    assert str(parsed[0]) == spec
    # the same types, not only equal values: keep=1 (one token) is not keep=1.0 (every token)
    assert registry.same_value(tuple(vars(parsed[0]).values()), tuple(vars(reducer).values()))


def test_every_registered_reducer_round_trips():
    covered = {registry.name_of(type(reducer)) for reducer, _ in ROUND_TRIPS}
    assert covered == set(tokred.list_reducers())


def test_ints_stay_ints_and_floats_floats():
    assert tokred.parse_spec("dart:keep=1")[0].keep == 1 and isinstance(tokred.parse_spec("dart:keep=1")[0].keep, int)
    assert isinstance(tokred.parse_spec("dart:keep=1.0")[0].keep, float)
    assert tokred.parse_spec("thresholds:merge=1e+3")[0].merge == 1000.0
    assert tokred.parse_spec("thresholds:prune=inf/merge=-inf")[0] == tokred.Thresholds(merge=-float("inf"),
                                                                                         prune=float("inf"))


@pytest.mark.parametrize("text, value", [
    ("16", 16), ("-3", -3), ("0.5", 0.5), (".5", 0.5), ("2.", 2.0), ("1e-3", 0.001), ("TRUE", True), ("false", False),
    ("none", None), ("keep", "keep"), ("16;-0.5", (16, -0.5)), ("(16;-0.5)", (16, -0.5)), ("1;2;3", [1, 2, 3]),
    ("[4;2]", [4, 2]), ("[4]", [4]), ("(1;2;3)", (1, 2, 3)), ("[]", []), ("a;true;none", ["a", True, None]),
])
def test_values(text, value):
    parsed = registry.parse_value(text)
    assert parsed == value and type(parsed) is type(value)
    assert registry.parse_value(registry.format_value(value)) == value


def test_sequences_become_what_the_field_expects():
    assert tokred.parse_spec("tome:r=(16;-0.5)")[0].r == (16, -0.5)  # ToMe's schedule: a tuple
    assert tokred.parse_spec("tome:r=[8;8;4]")[0].r == [8, 8, 4]  # one r per block: a list
    assert tokred.parse_spec("pool:stride=(1;2)") == (tokred.Pool(stride=(1, 2)),)
    with pytest.raises(ValueError, match=r"out of range"):  # two items without brackets: a (r, inflection) schedule
        tokred.parse_spec("tome:r=4;2")


# compositions -------------------------------------------------------------------------------
def test_compositions():
    spec = "tome:r=16+divprune:keep=0.25+dart:layer=3/keep=0.5"
    reducers = tokred.parse_spec(spec)
    assert reducers == (tokred.ToMe(r=16), tokred.DivPrune(keep=0.25), tokred.DART(keep=0.5, layer=3))
    assert "+".join(map(str, reducers)) == "tome:r=16+divprune:keep=0.25+dart:keep=0.5/layer=3"
    assert tokred.parse_spec("+".join(map(str, reducers))) == reducers
    assert tokred.parse_spec("pool:stride=2/stage=projector+fastv:keep=64") == (
        tokred.Pool(stride=2, stage="projector"), tokred.FastV(keep=64))


def test_none():
    assert tokred.parse_spec("none") == ()
    assert tokred.parse_spec("NONE") == ()
    assert tokred.parse_spec(" none ") == ()  # surrounding whitespace is tolerated, inner is not


@pytest.mark.parametrize("spec, message", [
    ("tomee:r=4", "unknown reducer 'tomee' (did you mean 'tome'?); known reducers: adjacent, atp, dart, divprune, "
                  "dtome, dycoke, fastv, "
                  "holitom, holitom_inner, matryoshka, pitome, pool, random, thresholds, tome, uniform, visionzip, vtu"),
    ("tome:r=4+fastvv:keep=2", "'fastvv:keep=2' of 'tome:r=4+fastvv:keep=2': unknown reducer 'fastvv' (did you "
                               "mean 'fastv'?)"),
    ("tome:ratio=4", "unknown parameter 'ratio' for tome; its parameters are: r, prop_attn"),
    ("dart:keep", "expected key=value, got 'keep'"),
    ("dart:keep=", "expected key=value"),
    ("dart:=0.5", "expected key=value"),
    ("tome:", "expected key=value"),
    ("tome:r=4,pool:stride=2", "contains a comma"),
    ("tome:r=4+pool:stride=(1,2)", "contains a comma"),
    ("tome:r=4 +pool:stride=2", "contains a space"),
    ("tome:r=4/r=8", "parameter 'r' given twice"),
    ("tome:r=4+", "empty reducer"),
    ("+tome:r=4", "empty reducer"),
    ("none+tome:r=4", "'none' stands alone"),
    ("none:r=2", "'none' stands alone"),
    ("", "empty reducer spec"),
    ("tome:r=(4;2", "does not end with ')'"),
    ("tome:r=4;;2", "empty item"),
    ("tome:r=[4;(2)]", "nested"),
    ("tome:r=a*b", "cannot parse 'a*b'"),
    ("dart:layer=2", "reducer 'dart' needs keep"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tokred.parse_spec(spec)


def test_bad_spec_errors_show_an_example():
    with pytest.raises(ValueError, match=re.escape(f"expected e.g. '{registry.EXAMPLE}'")):
        tokred.parse_spec("tome:ratio=4")


@pytest.mark.parametrize("spec, message", [
    ("divprune:keep=0", "keep must be a fraction in (0, 1] (a float) or a number of tokens >= 1 (an int), got 0"),
    ("dart:keep=1.5", "keep must be a fraction in (0, 1]"),
    ("tome:r=-1", "r must be >= 0"),
    ("tome:prop_attn=1", "prop_attn must be True or False, got 1"),  # a TypeError of the reducer
    ("random:stage=llm", "stage"),
    ("pool:stride=[1;2]", "stride must be an int >= 1 or a (rows, cols) pair"),
])
def test_values_the_reducer_rejects(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        tokred.parse_spec(spec)
    assert f"bad reducer spec '{spec}'" in str(error.value)




# third-party reducers -----------------------------------------------------------------------
@dataclass(frozen=True)
class Every(Reducer):
    """Keeps every ``every``-th visual token before the language model (a third party's reducer)."""

    every: int = 2
    offsets: tuple[int, int] = (0, 0)
    mode: str = "strided"

    stage = "projector"


@dataclass(frozen=True)
class Other(Reducer):
    keep: float = 0.5

    stage = "projector"


def test_decorator_registers_a_third_party_reducer(clean_registry):
    assert str(Every(every=3)) == repr(Every(every=3))  # not registered: str falls back to repr
    assert tokred.register_reducer("every")(Every) is Every
    assert "every" in tokred.list_reducers()
    reducer = Every(every=4, offsets=(1, 0), mode="dense")
    assert str(reducer) == "every:every=4/offsets=1;0/mode=dense"
    assert tokred.parse_spec(str(reducer)) == (reducer,)
    assert tokred.parse_spec("tome:r=2+every:every=3") == (tokred.ToMe(r=2), Every(every=3))
    assert tokred.reducer("every", every=5) == Every(every=5)
    tokred.register_reducer("every")(Every)  # the same class again: nothing changes
    with pytest.raises(ValueError, match="reducer name 'every' is already taken by .*Every"):
        tokred.register_reducer("every")(Other)
    with pytest.raises(ValueError, match="'tome' is already taken by tokred.reducers.tome.ToMe"):
        tokred.register_reducer("tome")(Other)
    with pytest.raises(ValueError, match="already registered as 'every'"):
        tokred.register_reducer("every2")(Every)
    with pytest.raises(TypeError, match="subclass of tokred.Reducer"):
        tokred.register_reducer("thing")(dict)
    with pytest.raises(ValueError, match="lowercase letters"):
        tokred.register_reducer("My-Reducer")
    for mode in ("two words", "true", "1", "a+b"):  # would not read back as the same string: refused
        with pytest.raises(ValueError, match=re.escape(f"every:mode={mode!r} cannot be written in a spec")):
            registry.to_spec(Every(mode=mode))
        assert str(Every(mode=mode)) == repr(Every(mode=mode))


class FakeEntryPoint:
    def __init__(self, name: str, value: str, load):
        self.name, self.value, self._load = name, value, load

    def load(self):
        return self._load()


def test_entry_point_reducers_load_lazily(clean_registry, monkeypatch):
    calls = []

    def fake_entry_points(group):
        calls.append(group)
        return [FakeEntryPoint("other", "thirdparty.reducers:Other", lambda: Other)]

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    assert calls == []  # nothing is loaded before the first lookup
    assert tokred.parse_spec("other:keep=0.25") == (Other(keep=0.25),)
    assert calls == ["tokred.reducers"]
    assert "other" in tokred.list_reducers() and str(Other(keep=0.25)) == "other:keep=0.25"
    tokred.reducer("other")
    assert calls == ["tokred.reducers"]  # loaded once


def test_broken_entry_point_gives_a_clear_error(clean_registry, monkeypatch):
    def fail():
        raise ImportError("No module named 'thirdparty'")

    monkeypatch.setattr(registry, "entry_points", lambda group: [
        FakeEntryPoint("broken", "thirdparty.reducers:Broken", fail),
        FakeEntryPoint("tome", "thirdparty.reducers:Other", lambda: Other),
        FakeEntryPoint("notareducer", "thirdparty.reducers:thing", lambda: dict)])
    assert tokred.parse_spec("tome:r=2") == (tokred.ToMe(r=2),)  # the others still work
    with pytest.raises(ValueError, match=re.escape("entry point 'broken = thirdparty.reducers:Broken' (group "
                                                   "tokred.reducers) failed to load: ImportError: No module "
                                                   "named 'thirdparty'")):
        tokred.parse_spec("broken:keep=1")
    with pytest.raises(ValueError, match="subclass of tokred.Reducer"):
        tokred.reducer("notareducer")
    assert "broken" not in tokred.list_reducers() and registry.reducer_class("tome") is tokred.ToMe


# issue 19: saving only what reads back, clear errors --------------------------------------------
@dataclass(frozen=True)
class MyToMe(tokred.ToMe):
    """A user's subclass of a registered reducer, not registered itself."""


@pytest.mark.parametrize("given, message", [
    (MyToMe(r=4), "MyToMe(r=4, prop_attn=True) has no spec: its class test_registry.MyToMe is not a registered "
                  "reducer; register a dataclass with @tokred.register_reducer('name')"),
    (Every(every=3), "is not a registered reducer"),
    ("tome", "expected a tokred reducer such as tokred.ToMe(r=8), got 'tome' (a spec string is already a spec"),
    (None, "expected a tokred reducer"),
])
def test_save_reducers_refuses_what_it_cannot_read_back(tmp_path, given, message):
    path = tmp_path / "r.json"
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        tokred.save_reducers(path, tokred.DivPrune(keep=0.25), given)
    assert not path.exists()  # nothing written


def test_save_reducers_writes_what_load_reducers_reads_back(tmp_path):
    reducers = (tokred.ToMe(r=(8, -0.5)), tokred.DivPrune(keep=0.25), tokred.DART(keep=1, layer=3))
    tokred.save_reducers(tmp_path / "r.json", *reducers)
    assert tokred.load_reducers(tmp_path / "r.json") == reducers


def _budget_file(tmp_path, budgets):
    import json

    from tokred.reducers.budget import Budget

    budget = Budget("distortion", 0.3, (0.1, 0.2, 0.4), 0.5)
    path = tmp_path / "r.json"
    tokred.save_reducers(path, tokred.ToMe(r=2), tokred.DivPrune(keep=budget))
    data = json.loads(path.read_text())
    data["budgets"] = budgets(data["budgets"]["1"])
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("budgets, message", [
    (lambda b: [b], "'budgets' is [{"),
    (lambda b: {"2": b}, "bad 'budgets' entry '2' (the spec holds 'tome:r=2+divprune:keep=1.0')"),
    (lambda b: {"one": b}, "bad 'budgets' entry 'one'"),
    (lambda b: {"-1": b}, "bad 'budgets' entry '-1'"),
    (lambda b: {"0": b}, "bad 'budgets' entry '0'"),  # ToMe has no keep
    (lambda b: {"1": 0.5}, "bad 'budgets' entry '1': TypeError"),
    (lambda b: {"1": {**b, "signal": "entropy"}}, "bad 'budgets' entry '1': ValueError: unknown budget signal"),
    (lambda b: {"1": {k: v for k, v in b.items() if k != "fitted"}}, "bad 'budgets' entry '1': TypeError"),
])
def test_malformed_budgets_name_the_entry_and_the_shape(tmp_path, budgets, message):
    path = _budget_file(tmp_path, budgets)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        tokred.load_reducers(path)
    assert "maps the index of a reducer with a keep (0..1, a string) to a Budget as Budget.to_json writes it " \
           "(keys: signal, mean_keep, calibration, fitted, buckets, min_keep, max_keep, eps)" in str(error.value)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("spec, hint", [
    ("tom", "unknown reducer 'tom' (did you mean 'tome'?)"),
    ("holitom-inner:layer=2", "unknown reducer 'holitom-inner' (did you mean 'holitom_inner'?)"),
    ("divprune:kep=0.25", "unknown parameter 'kep' for divprune (did you mean 'keep'?); its parameters are: keep, "
                          "positions"),
    ("tome:r=2+dart:kep=0.5", "unknown parameter 'kep' for dart (did you mean 'keep'?)"),
])
def test_typos_get_did_you_mean(spec, hint):
    with pytest.raises(ValueError, match=re.escape(hint)):
        tokred.parse_spec(spec)


def test_typos_get_did_you_mean_by_name_too():
    with pytest.raises(ValueError, match=re.escape("unknown reducer 'tom' (did you mean 'tome'?)")):
        tokred.reducer("tom", r=2)
    with pytest.raises(ValueError, match=re.escape("unknown parameter 'kep' for reducer 'fastv' (did you mean "
                                                   "'keep'?)")):
        tokred.reducer("fastv", kep=2)
    with pytest.raises(ValueError) as error:  # nothing close: no guess
        tokred.reducer("zzzz")
    assert "did you mean" not in str(error.value)


@pytest.mark.parametrize("spec, part", [
    ("tome:r=+5", "'tome:r=+5'"),
    ("tome:r=(+5;-0.5)", "'tome:r=(+5;-0.5)'"),
    ("tome:r=2+dart:keep=+0.5/layer=2", "'dart:keep=+0.5/layer=2' of 'tome:r=2+dart:keep=+0.5/layer=2'"),
])
def test_a_value_never_starts_with_plus(spec, part):
    with pytest.raises(ValueError, match=re.escape(f"bad reducer spec {part}: a value never starts with '+' (a '+' "
                                                   "joins two reducers): write 5, not +5")):
        tokred.parse_spec(spec)
    assert tokred.parse_spec("thresholds:merge=1e+3+tome:r=5") == (tokred.Thresholds(merge=1000.0), tokred.ToMe(r=5))


def test_a_reducer_without_parameters_says_so():
    for call in (lambda: tokred.parse_spec("vtu:x=1"), lambda: tokred.reducer("vtu", x=1)):
        with pytest.raises(ValueError, match="unknown parameter 'x' for (reducer )?'?vtu'?; vtu takes no parameters"):
            call()
