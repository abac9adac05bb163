"""soco-serve: soco checkpoints in transformers and vLLM.

Importing the package registers the ``soco`` quantization method with transformers
(:mod:`soco_serve.hf`), so that ``AutoModelForCausalLM.from_pretrained(dir)`` builds the low-rank
model of a soco checkpoint. vLLM needs no import: it loads the plugin (:mod:`soco_serve.plugin`)
through its ``vllm.general_plugins`` entry point.
"""

from soco_serve import hf as _hf  # noqa: F401  (registration happens at import, once per process)
