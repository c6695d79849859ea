"""Hugging Face weights both ways: `from_hf(path) -> (model, model_config)`, `to_hf(model, model_config, path)`
(api.py), run directories the trainer resumes (run_dir.py), and `python -m engine.convert from-hf|to-hf`.

Names load on first use: importing this package imports neither transformers nor safetensors.
"""

from engine._lazy import lazy_exports

_EXPORTS = {
    "from_hf": "engine.convert.api",
    "to_hf": "engine.convert.api",
    "ConvertError": "engine.convert.hf_config",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
