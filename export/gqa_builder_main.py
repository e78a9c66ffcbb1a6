"""``python -m toolkit.export.gqa_builder_main ARGS``: onnxruntime-genai's builder CLI with one fix.

The builder (0.15) places Gemma 3's full-attention layers by the default pattern (every sixth
layer) and ignores an explicit ``layer_types`` in the config; a checkpoint whose list differs would
get a sliding window and the local rotary tables on a global layer. Here ``is_local`` follows
``layer_types`` whenever the config has one; everything else is the builder's own ``__main__``.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

BUILDER_MODULE = "onnxruntime_genai.models.builder"


def follow_layer_types(checkpoint: Path) -> bool:
    """Patch the builder's Gemma 3 layer placement to read ``layer_types``; False when there is none."""
    layer_types = json.loads((checkpoint / "config.json").read_text()).get("layer_types")
    if not layer_types:
        return False
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's ``builders`` package on sys.path)
    from builders.gemma import Gemma3Model

    Gemma3Model.is_local = lambda self, layer_id: layer_types[layer_id] != "full_attention"
    return True


def main(argv: list[str]) -> None:
    follow_layer_types(Path(argv[argv.index("-i") + 1]))
    sys.argv = [BUILDER_MODULE, *argv]
    runpy.run_module(BUILDER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
