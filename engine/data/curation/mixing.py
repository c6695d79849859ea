"""Domain mixing: per-domain weights turned into the blend string `--data.path` takes ("w1 prefix1 w2 prefix2").

Temperature sampling draws domain i with probability p_i ∝ n_i^(1/T), n_i its size (tokens, or documents). T = 1 is
proportional to size, T -> inf is uniform, and 1 < T < inf up-samples small domains. This is the multilingual
recipe: Lample & Conneau 2019 (XLM, §3.1, q_i = p_i^α / Σ_j p_j^α with α = 0.5), Conneau et al. 2020 (XLM-R,
α = 0.3), Xue et al. 2021 (mT5, α = 0.3) and Arivazhagan et al. 2019 (T = 5), where α = 1/T. Normalising the
n_i to fractions first changes nothing: the common factor cancels. Fixed weights are normalised to sum 1.

`python -m engine.data.curate mix --domain NAME=PREFIX ... [--temperature T | --weights NAME=W,...]` reads each
PREFIX.idx for its size and prints the blend string; bad input prints one line and exits 2.
"""

import argparse
import math
import sys
from collections.abc import Mapping, Sequence

from engine.data.indexed_dataset import IndexedDataset, idx_path

COUNTS = ("tokens", "documents")


class MixingError(ValueError):
    """Domain weights or domains that cannot make a blend (printed as one line)."""


def temperature_weights(sizes: Mapping[str, float], temperature: float) -> dict[str, float]:
    """p_i = n_i^(1/T) / Σ_j n_j^(1/T) for each domain; T = inf gives the uniform mix.

    Computed in log space (exp((log n_i - max_j log n_j) / T)) so billions of tokens with T near 0 do not overflow.
    """
    if not sizes:
        raise MixingError("no domains to mix")
    if not temperature > 0:  # also refuses NaN
        raise MixingError(f"temperature must be > 0 (1: proportional, inf: uniform), got {temperature}")
    for name, n in sizes.items():
        if not (math.isfinite(n) and n > 0):
            raise MixingError(f"domain {name!r} has size {n}; every domain needs a positive size to be mixed")
    logs = {name: math.log(n) for name, n in sizes.items()}
    top = max(logs.values())
    powered = {name: math.exp((v - top) / temperature) for name, v in logs.items()}
    total = sum(powered.values())
    return {name: v / total for name, v in powered.items()}


def fixed_weights(weights: Mapping[str, float], domains: Sequence[str]) -> dict[str, float]:
    """The given weights, one per domain (non-negative, finite, positive sum), normalised to sum 1."""
    unknown = [name for name in weights if name not in domains]
    if unknown:
        raise MixingError(f"weight for unknown domain {unknown[0]!r}; domains: {', '.join(domains)}")
    missing = [name for name in domains if name not in weights]
    if missing:
        raise MixingError(f"no weight for domain {missing[0]!r}; give one weight per domain")
    for name, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise MixingError(f"weight {w} for domain {name!r} must be finite and >= 0")
    total = sum(weights.values())
    if total <= 0:
        raise MixingError("the weights sum to 0; at least one must be positive")
    return {name: weights[name] / total for name in domains}


def domain_size(prefix: str, count: str = "tokens") -> int:
    """Tokens (or documents) of the indexed dataset PREFIX, read from PREFIX.idx."""
    if count not in COUNTS:
        raise MixingError(f"unknown count {count!r}; choose from {', '.join(COUNTS)}")
    if not IndexedDataset.exists(prefix):
        raise FileNotFoundError(f"dataset prefix {prefix!r}: {idx_path(prefix)} (or its .bin) not found")
    ds = IndexedDataset(prefix)
    return ds.num_tokens if count == "tokens" else ds.num_documents


def blend_string(weights: Mapping[str, float], prefixes: Mapping[str, str]) -> str:
    """The blend "w1 prefix1 w2 prefix2 ..." in the domains' order (weights to 6 significant digits, as
    engine.data.blended_dataset.parse_blend reads them)."""
    for name, prefix in prefixes.items():
        if not prefix or any(c.isspace() for c in prefix):
            raise MixingError(f"domain {name!r}: prefix {prefix!r} is empty or holds whitespace, which a blend cannot")
    return " ".join(f"{weights[name]:.6g} {prefixes[name]}" for name in prefixes)


def parse_domains(items: Sequence[str]) -> dict[str, str]:
    """["NAME=PREFIX", ...] -> {name: prefix}, in order; names unique."""
    domains: dict[str, str] = {}
    for item in items:
        name, sep, prefix = item.partition("=")
        if not sep or not name or not prefix:
            raise MixingError(f"--domain {item!r}: expected NAME=PREFIX")
        if name in domains:
            raise MixingError(f"--domain {name!r} given twice")
        domains[name] = prefix
    return domains


def parse_weights(spec: str) -> dict[str, float]:
    """Parses "NAME=W,NAME=W" into {name: weight}."""
    weights: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, text = item.strip().partition("=")
        if not sep or not name:
            raise MixingError(f"--weights item {item!r}: expected NAME=WEIGHT")
        if name in weights:
            raise MixingError(f"--weights gives domain {name!r} twice")
        try:
            weights[name] = float(text)
        except ValueError:
            raise MixingError(f"--weights: weight {text!r} for domain {name!r} is not a number") from None
    return weights


def mix(
    domains: Mapping[str, str],
    temperature: float | None = None,
    weights: Mapping[str, float] | None = None,
    count: str = "tokens",
) -> tuple[str, dict[str, float], dict[str, int]]:
    """The blend string for `domains` ({name: prefix}), its normalised weights and each domain's size.

    Fixed `weights` when given, else temperature sampling over the sizes (T = 1 when `temperature` is None too).
    """
    if not domains:
        raise MixingError("no domains to mix: give --domain NAME=PREFIX at least once")
    if temperature is not None and weights is not None:
        raise MixingError("give a temperature or fixed weights, not both")
    sizes = {name: domain_size(prefix, count) for name, prefix in domains.items()}
    if weights is not None:
        probs = fixed_weights(weights, list(domains))
    else:
        probs = temperature_weights(sizes, 1.0 if temperature is None else temperature)
    return blend_string(probs, domains), probs, sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.data.curate mix", description="Print the --data.path blend string for domains."
    )
    p.add_argument("--domain", action="append", required=True, help="NAME=PREFIX of an indexed dataset (repeat)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--temperature", type=float, help="p_i ∝ n_i^(1/T): 1 proportional (default), inf uniform")
    group.add_argument("--weights", help="fixed weights NAME=W,NAME=W (normalised)")
    p.add_argument("--count", choices=COUNTS, default="tokens", help="domain size n_i (default: tokens)")
    p.add_argument("--verbose", action="store_true", help="also print each domain's size and weight to stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        weights = parse_weights(args.weights) if args.weights is not None else None
        blend, probs, sizes = mix(parse_domains(args.domain), args.temperature, weights, args.count)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.verbose:
        for name, p in probs.items():
            print(f"{name}: {sizes[name]} {args.count}, weight {p:.6g}", file=sys.stderr)
    print(blend)
    return 0
