"""Inference serving: warm runners (``runner_pool``), input checks (``validation``), wire formats
(``codecs``).

The composition root (:func:`service.services.open_services`) creates the service's one
:class:`~service.serving.runner_pool.RunnerPool`, sized by ``runner_cache_bytes``; the inference and
report routers reach it as ``services.runner_pool``, and it is closed at shutdown.
"""
