"""Reducers: small config objects plus pure algorithms on tensors."""
from tokred.reducers.base import STAGES, Reducer
from tokred.reducers.pitome import PiToMe, energy_matching
from tokred.reducers.tome import ToMe, bipartite_soft_matching

__all__ = ["STAGES", "PiToMe", "Reducer", "ToMe", "bipartite_soft_matching", "energy_matching"]
