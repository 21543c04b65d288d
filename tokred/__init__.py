"""tokred: composable visual token reduction for ViTs and vision-language models."""
from tokred import viz
from tokred.api import applied, apply, flops, last_trace, reducers_of, remove
from tokred.calibrate import calibrate
from tokred.flops import FlopsReport
from tokred.plan import Plan
from tokred.reducers import (ATP, DART, AdjacentMerge, Budget, DivPrune, DToMe, FastV, Matryoshka, PiToMe, Pool, Random, Reducer, Thresholds, ToMe, VTU,
                             DyCoke, Uniform, VisionZip, HoliTom, HoliTomInner,
                             bipartite_soft_matching, calibrate_dtome, energy_matching)
from tokred.registry import list_reducers, load_reducers, parse_spec, reducer, register_reducer, save_reducers
from tokred.trace import LayerRecord, Trace

__version__ = "0.1.0"

__all__ = [
    "ATP", "AdjacentMerge", "Budget", "DART", "DToMe", "DivPrune", "FastV", "FlopsReport", "LayerRecord", "Matryoshka", "PiToMe", "Plan", "Pool", "Random",
    "Reducer", "Thresholds", "ToMe", "Trace", "VTU", "DyCoke", "Uniform", "VisionZip", "HoliTom", "HoliTomInner",
    "applied", "apply", "bipartite_soft_matching", "calibrate", "calibrate_dtome", "energy_matching", "flops", "last_trace",
    "list_reducers", "load_reducers", "parse_spec", "reducer", "reducers_of", "register_reducer", "remove",
    "save_reducers", "viz",
]
