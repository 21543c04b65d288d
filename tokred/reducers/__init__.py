"""Reducers: small config objects plus pure algorithms on tensors."""
from tokred.reducers.adjacent import AdjacentMerge
from tokred.reducers.atp import ATP
from tokred.reducers.base import STAGES, Reducer
from tokred.reducers.baselines import Matryoshka, Pool, Random, grid_pooling, random_keep
from tokred.reducers.budget import Budget
from tokred.reducers.dart import DART
from tokred.reducers.divprune import DivPrune
from tokred.reducers.dtome import DToMe, calibrate_dtome, dtome_plan
from tokred.reducers.fastv import FastV
from tokred.reducers.holitom import HoliTom, HoliTomInner
from tokred.reducers.pitome import PiToMe, energy_matching
from tokred.reducers.thresholds import Thresholds, threshold_plan
from tokred.reducers.tome import ToMe, bipartite_soft_matching
from tokred.reducers.video import DyCoke, Uniform, VisionZip, dycoke_ttm, uniform_keep, visionzip_frame
from tokred.reducers.vtu import VTU, remerge_plan

__all__ = ["ATP", "DART", "AdjacentMerge", "Budget", "DToMe", "Matryoshka", "calibrate_dtome", "dtome_plan", "STAGES", "DivPrune", "FastV", "PiToMe", "Pool", "Random", "Reducer", "Thresholds", "ToMe", "bipartite_soft_matching",
           "energy_matching", "grid_pooling", "random_keep", "remerge_plan", "threshold_plan", "VTU",
           "DyCoke", "Uniform", "VisionZip", "dycoke_ttm", "uniform_keep", "visionzip_frame",
           "HoliTom", "HoliTomInner"]
