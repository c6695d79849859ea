"""Two byte-level domains for blend tests: stdlib source ("code", learnable) and uniformly random bytes in documents
of the same lengths ("noise": nothing to learn, its best loss log 256 is where an untrained model starts)."""

import inspect
import json
import random


def build_domain_data(root) -> dict[str, str]:
    """Indexed datasets code_train, code_valid, noise_train, noise_valid under `root` (byte ids < 256); returns
    {name: prefix}."""
    from engine.data.indexed_dataset import IndexedDatasetBuilder

    text = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
    docs = [list(d.encode()) for d in text.split("\n\n") if len(d) > 20]
    rng = random.Random(0)
    noise = [[rng.randrange(256) for _ in d] for d in docs]
    prefixes = {}
    for domain, domain_docs in (("code", docs), ("noise", noise)):
        for split, part in (("train", domain_docs[:-8]), ("valid", domain_docs[-8:])):
            prefix = prefixes[f"{domain}_{split}"] = str(root / f"{domain}_{split}")
            builder = IndexedDatasetBuilder(prefix, vocab_size=256)
            for d in part:
                builder.add_document(d)
            builder.finalize()
    return prefixes
