"""Data curation: quality filters (Gopher, C4, FineWeb), exact, MinHash near-duplicate and suffix-array substring
dedup, PII redaction, language identification with a user-provided fastText model, run as resumable stages over input
files on a local process pool or Ray (`python -m engine.data.curate`). Names load on first use."""

from engine._lazy import lazy_exports

_EXPORTS = {
    "curate": "engine.data.curation.runner",
    "Pipeline": "engine.data.curation.pipeline",
    "FINEWEB_STEPS": "engine.data.curation.pipeline",
    "CurationError": "engine.data.curation.steps",
    "DocumentStep": "engine.data.curation.steps",
    "DedupStep": "engine.data.curation.steps",
    "register_step": "engine.data.curation.steps",
    "make_step": "engine.data.curation.steps",
    "LocalExecutor": "engine.data.curation.executor",
    "RayExecutor": "engine.data.curation.ray_executor",
    "read_documents": "engine.data.curation.documents",
    "document_writer": "engine.data.curation.documents",
    "GopherQualityFilter": "engine.data.curation.gopher",
    "GopherRepetitionFilter": "engine.data.curation.gopher",
    "C4QualityFilter": "engine.data.curation.c4",
    "FineWebQualityFilter": "engine.data.curation.fineweb",
    "PIIRedactor": "engine.data.curation.pii",
    "LanguageID": "engine.data.curation.language_id",
    "ExactDedup": "engine.data.curation.exact_dedup",
    "MinHashDedup": "engine.data.curation.minhash",
    "SubstringDedup": "engine.data.curation.substring_dedup",
    "lsh_match_probability": "engine.data.curation.minhash",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
