"""Data spine: tokenizer, Megatron-compatible indexed datasets, GPT samples, blending, the embedded corpus.

Names load on first use.
"""

from engine._lazy import lazy_exports

_EXPORTS = {
    "IndexedDataset": "engine.data.indexed_dataset",
    "IndexedDatasetBuilder": "engine.data.indexed_dataset",
    "GPTDataset": "engine.data.gpt_dataset",
    "GPTDatasetError": "engine.data.gpt_dataset",
    "BlendedDataset": "engine.data.blended_dataset",
    "BlendError": "engine.data.blended_dataset",
    "parse_blend": "engine.data.blended_dataset",
    "build_dataset": "engine.data.blended_dataset",
    "ResumableSampler": "engine.data.sampler",
    "SamplerError": "engine.data.sampler",
    "micro_batch_indices": "engine.data.sampler",
    "num_micro_batches": "engine.data.sampler",
    "build_sample_idx": "engine.data.helpers",
    "build_blending_indices": "engine.data.helpers",
    "merge_datasets": "engine.data.indexed_dataset",
    "optimal_dtype": "engine.data.indexed_dataset",
    "load_tokenizer": "engine.data.tokenizer",
    "Tokenizer": "engine.data.tokenizer",
    "ByteTokenizer": "engine.data.tokenizer",
    "HFTokenizer": "engine.data.tokenizer",
    "prepare_embedded": "engine.data.embedded",
    "EmbeddedData": "engine.data.embedded",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
