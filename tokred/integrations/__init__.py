"""Glue to other tools, each imported only when that tool asks for it. Importing tokred imports none of them.

- :mod:`tokred.integrations.lmms_eval`: the lmms-eval model plugin (``lmms-eval --model tokred``), found by
  lmms-eval through the entry point ``[project.entry-points."lmms_eval.models"]``, which names
  :func:`lmms_eval_manifests` here so that building lmms-eval's model registry imports nothing of the plugin.
"""


def lmms_eval_manifests():
    """lmms-eval's entry point (group ``lmms_eval.models``): the manifest of the ``tokred`` model, whose class
    (``tokred.integrations.lmms_eval.TokredModel``) lmms-eval imports only when a run asks for it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="tokred", simple_class_path="tokred.integrations.lmms_eval.TokredModel")]
