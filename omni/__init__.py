"""omni: unified models that read and write interleaved text and continuous-token images.

The stable Python API (what scripts and notebooks import):

    import omni
    model = omni.load("demo_out/model", device="cpu")          # an inference checkpoint directory
    results = omni.generate(model, [["a red circle left of a blue square."]], mode="image")
    results[0].images[0].save("out.png"); print(results[0].settings)

    cfg = omni.GenerationConfig(cfg_scale=3.0, image_steps=50)   # sampling settings
    run = omni.load_config("tiny", ["train.steps=100"])          # a training recipe

Each result has `.segments` (str | PIL.Image, in order), `.text`, `.images`, `.settings` (the exact
sampler settings and seed) and `.finish_reason`. The names load lazily, so `import omni` stays
light (no torch until a model is needed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute); resolved on first use
_API = {
    "load": ("omni.inference.generate", "load"),
    "generate": ("omni.inference.generate", "generate"),
    "GenerationConfig": ("omni.config", "GenerationConfig"),
    "load_config": ("omni.config", "load_config"),
    "GenerationResult": ("omni.inference.rows", "GenerationResult"),
    "GenerationEvents": ("omni.inference.rows", "GenerationEvents"),
}

__all__ = ["GenerationConfig", "GenerationEvents", "GenerationResult", "__version__", "generate", "load",
           "load_config"]

if TYPE_CHECKING:
    from omni.config import GenerationConfig, load_config
    from omni.inference.generate import generate, load
    from omni.inference.rows import GenerationEvents, GenerationResult


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'omni' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
