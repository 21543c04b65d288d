"""Glue to other tools, each imported only when that tool asks for it. Importing tokred imports none of them.

- :mod:`tokred.integrations.lmms_eval`: the lmms-eval model plugin (``lmms-eval --model tokred``), found by
  lmms-eval through the entry point ``[project.entry-points."lmms_eval.models"]``, which names
  :func:`lmms_eval_manifests` here so that building lmms-eval's model registry imports nothing of the plugin;
  :func:`lmms_eval_costs` reads the plugin's costs back from a results file without lmms-eval (``tokred report``).
"""
from __future__ import annotations

from collections import defaultdict

#: the prefix of the plugin's cost metrics in lmms-eval's results (``throughput``): ``avg_tokred/<task>/<metric>``
LMMS_EVAL_PREFIX = "avg_tokred/"


def lmms_eval_manifests():
    """lmms-eval's entry point (group ``lmms_eval.models``): the manifest of the ``tokred`` model, whose class
    (``tokred.integrations.lmms_eval.TokredModel``) lmms-eval imports only when a run asks for it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="tokred", simple_class_path="tokred.integrations.lmms_eval.TokredModel")]


def lmms_eval_costs(results: dict) -> dict[str, dict[str, float]]:
    """The lmms-eval plugin's per-task cost summary from lmms-eval's results (the dict ``simple_evaluate``
    returns or the ``*_results.json`` the CLI writes): ``{task: {metric: value}}``, the metrics of
    ``tokred.integrations.lmms_eval.COST_METRICS``; empty for a run of another model."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in (results.get("throughput") or {}).items():
        if key.startswith(LMMS_EVAL_PREFIX):
            task, _, metric = key[len(LMMS_EVAL_PREFIX):].rpartition("/")
            out[task][metric] = value
    return dict(out)
