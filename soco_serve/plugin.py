"""vLLM plugin entry point (group ``vllm.general_plugins``, name ``soco``).

vLLM calls :func:`register` in every process it starts (CLI, engine core, workers), so it is
idempotent and imports vLLM lazily: importing :mod:`soco_serve.loader` once registers load
format ``soco`` with vLLM's model-loader registry and, through :mod:`soco_serve.linear`, the
quantization method ``soco`` that a format-2 checkpoint's ``config.json`` names.
"""


def register() -> None:
    import soco_serve.loader  # noqa: F401  (registration happens at import, once per process)
