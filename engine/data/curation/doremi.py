"""DoReMi domain weights (Xie et al. 2023, "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining",
Algorithm 1), computed in rounds of the engine's own trainer; the output is a blend string `--data.path` takes.

1. A reference model trains on the baseline weights (uniform unless given); its validation loss on each domain,
   ℓ_ref,i, is what the proxy is measured against.
2. A proxy model of the same shape trains in T rounds of s steps. Round t trains on the blend α_{t-1} (α_0: the
   baseline) and resumes the proxy's checkpoint; after it, the proxy's validation loss on each domain ℓ_t,i gives
   the clipped excess loss λ_t,i = max(ℓ_t,i − ℓ_ref,i, 0) and the exponentiated-gradient step with smoothing c:
       α'_t,i = α_{t-1},i exp(η λ_t,i) / Σ_j α_{t-1},j exp(η λ_t,j),     α_t,i = (1 − c) α'_t,i + c / n
   (n domains; Algorithm 1's update, η = 1 and c = 1e-3 there too).
3. The result is the mean of α_1 .. α_T (Algorithm 1 returns the average over steps, not the last weights).

Where this differs from Algorithm 1, and why: the paper updates α every step from the proxy's per-token excess
losses on the training batch (clipped per token) and reweights the proxy's loss by α. That needs per-token losses of
a second (reference) model inside the training step and a domain-weighted loss in every step implementation (plain,
tensor, pipeline and context parallel, fused cross-entropy kernels that only return sums): an invasive change. Here
the trainer is used as it is: each round's blend resamples the data in proportion α where the paper reweights the
loss, and λ comes from the validation loss the trainer reports per blend component
(engine.training.evaluate), a per-domain mean over fixed held-out samples, clipped per domain. The update rule is the
paper's; its time step (a round, not a step) and the losses it reads differ. Each run is `python -m engine.train`
(or a launcher such as torchrun) in a child process, and the losses are read from the `val_loss/<component>` records
of its metrics.jsonl, so the proxy may use any layout the trainer supports.

`python -m engine.data.curate doremi --domain NAME=TRAIN_PREFIX ... --valid NAME=VALID_PREFIX ... --run-dir DIR
--rounds T --steps-per-round S [-- TRAINER FLAGS]` prints the blend; bad input prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.data.curation.mixing import MixingError, blend_string, fixed_weights, parse_domains, parse_weights

# Trainer flags the procedure sets itself (each run's data, length, evaluation and directory).
RESERVED_FLAGS = ("data.path", "data.valid_path", "train.steps", "eval.every", "run.dir", "checkpoint.every",
                  "optim.decay_steps", "checkpoint.force_resume", "resume")  # fmt: skip


class DoReMiError(MixingError):
    """Settings or results the DoReMi procedure cannot use (printed as one line)."""


def clipped_excess(proxy: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """λ_i = max(proxy_i − reference_i, 0) per domain of `reference`; every domain needs both losses."""
    missing = [name for name in reference if name not in proxy]
    if missing:
        raise DoReMiError(f"no proxy validation loss for domain {missing[0]!r}")
    return {name: max(proxy[name] - ref, 0.0) for name, ref in reference.items()}


def doremi_update(
    weights: Mapping[str, float], excess: Mapping[str, float], eta: float, smoothing: float
) -> dict[str, float]:
    """One step of Algorithm 1: α'_i ∝ α_i exp(η λ_i), then α_i = (1 − c) α'_i + c / n. Computed in log space
    (shifted by the largest exponent) so large η λ does not overflow; a zero weight stays zero before smoothing."""
    if not (math.isfinite(eta) and eta >= 0):
        raise DoReMiError(f"eta (the step size) must be finite and >= 0, got {eta}")
    if not 0 <= smoothing <= 1:
        raise DoReMiError(f"smoothing c must be in [0, 1], got {smoothing}")
    if set(weights) != set(excess):
        raise DoReMiError(f"weights and excess losses name different domains: {sorted(weights)} vs {sorted(excess)}")
    logs = {name: math.log(w) + eta * excess[name] for name, w in weights.items() if w > 0}
    if not logs:
        raise DoReMiError("every domain weight is 0")
    top = max(logs.values())
    powered = {name: math.exp(logs[name] - top) if name in logs else 0.0 for name in weights}
    total = sum(powered.values())
    n = len(weights)
    return {name: (1 - smoothing) * v / total + smoothing / n for name, v in powered.items()}


def average_weights(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The mean of α_1 .. α_T per domain (sums to 1 when each α_t does)."""
    if not history:
        raise DoReMiError("no rounds to average")
    return {name: sum(w[name] for w in history) / len(history) for name in history[0]}


@dataclass
class DoReMiRound:
    trained_on: dict[str, float]  # α_{t-1}: the blend weights of this round's training
    proxy_losses: dict[str, float]  # ℓ_t,i after the round
    excess: dict[str, float]  # λ_t,i
    weights: dict[str, float]  # α_t


@dataclass
class DoReMiResult:
    weights: dict[str, float]  # the average of α_1 .. α_T: the DoReMi weights
    blend: str  # those weights over the domains' training prefixes, for --data.path
    baseline: dict[str, float]
    reference_losses: dict[str, float]
    rounds: list[DoReMiRound] = field(default_factory=list)
    seconds: float = 0.0


def check_trainer_args(args: Sequence[str]) -> None:
    """Refuses trainer flags the procedure sets itself, naming the first."""
    for arg in args:
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if key in RESERVED_FLAGS:
            raise DoReMiError(f"trainer flag --{key} is set by the DoReMi procedure; leave it out")


Trainer = Callable[[list[str]], None]  # runs (or resumes) engine.train with these flags; raises if it fails


def subprocess_trainer(launcher: str = "") -> Trainer:
    """`LAUNCHER -m engine.train FLAGS` in a child process (LAUNCHER: this Python by default, or e.g. "torchrun
    --nproc-per-node 8" for a data-parallel proxy); its log goes to this process's stderr."""
    command = shlex.split(launcher) if launcher else [sys.executable]

    def run(flags: list[str]) -> None:
        # stdout is this command's answer (the blend): whatever the trainer prints there is passed on to stderr
        proc = subprocess.run([*command, "-m", "engine.train", *flags], stdout=subprocess.PIPE, text=True)
        sys.stderr.write(proc.stdout)
        if proc.returncode != 0:
            raise DoReMiError(f"the trainer exited with status {proc.returncode} (its error is printed above): "
                              f"{shlex.join(flags)}")  # fmt: skip

    return run


def logged_component_losses(run_dir: Path, step: int) -> dict[str, float]:
    """The per-component validation losses (`val_loss/<name>`) the trainer logged at `step` in RUN_DIR/metrics.jsonl."""
    from engine.metrics import read_metrics  # torch loads only when DoReMi runs, never for the other commands

    for record in read_metrics(run_dir / "metrics.jsonl"):
        if record.get("step") == step and "val_loss" in record:
            return {k.removeprefix("val_loss/"): v for k, v in record.items() if k.startswith("val_loss/")}
    raise DoReMiError(f"{run_dir / 'metrics.jsonl'} has no validation record at step {step}")


def run_doremi(
    domains: Mapping[str, tuple[str, str]],
    trainer_args: Sequence[str],
    run_dir: str | Path,
    rounds: int,
    steps_per_round: int,
    baseline: Mapping[str, float] | None = None,
    reference_steps: int | None = None,
    eta: float = 1.0,
    smoothing: float = 1e-3,
    trainer: Trainer | None = None,
    log: Callable[[str], None] | None = None,
) -> DoReMiResult:
    """DoReMi weights for `domains` ({name: (train prefix, validation prefix)}): a reference run of
    `reference_steps` (default rounds x steps_per_round) on the baseline weights (uniform by default), then the proxy's
    `rounds` rounds of `steps_per_round` steps, in `run_dir`/reference and `run_dir`/proxy. `trainer_args` are
    engine.train flags for both models (shape, batch, optimizer, tokenizer, device); the validation data is the
    uniform blend of the validation prefixes. `trainer` runs the trainer (default: `subprocess_trainer()`); the
    losses are read from what each run logged."""
    from engine.training.evaluate import component_names  # torch: only when DoReMi runs (see logged_component_losses)

    t0 = time.perf_counter()
    if len(domains) < 2:
        raise DoReMiError(f"DoReMi needs at least 2 domains, got {len(domains)}")
    if rounds < 1 or steps_per_round < 1:
        raise DoReMiError(f"--rounds and --steps-per-round must be >= 1, got {rounds} and {steps_per_round}")
    reference_steps = rounds * steps_per_round if reference_steps is None else reference_steps
    if reference_steps < 1:
        raise DoReMiError(f"--reference-steps must be >= 1, got {reference_steps}")
    check_trainer_args(trainer_args)
    names = list(domains)
    alpha = fixed_weights(baseline, names) if baseline is not None else {name: 1 / len(names) for name in names}
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise DoReMiError(f"run directory {run_dir} is not empty; give a new one")
    train_prefixes = {name: train_prefix for name, (train_prefix, _) in domains.items()}
    valid_prefixes = {name: valid for name, (_, valid) in domains.items()}
    valid_blend = blend_string({name: 1.0 for name in names}, valid_prefixes)
    trainer = trainer or subprocess_trainer()
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def validation_losses(blend: dict[str, float], steps: int, where: str, extra: list[str]) -> dict[str, float]:
        """Trains (or resumes) the run `where` to `steps` on `blend`; its per-domain validation losses there."""
        data = ["--data.path", blend_string(blend, train_prefixes), "--data.valid_path", valid_blend]
        trainer([*trainer_args, *data, "--train.steps", str(steps), "--run.dir", str(run_dir / where), *extra])
        logged = logged_component_losses(run_dir / where, steps)
        metrics = component_names(list(valid_prefixes.values()))  # the validation blend's component names
        losses = {name: logged[metric] for name, metric in zip(names, metrics) if metric in logged}
        missing = [name for name in names if name not in losses]
        if missing:
            raise DoReMiError(f"domain {missing[0]!r} has no validation loss at step {steps} of {run_dir / where}; "
                              "raise --eval.batches")  # fmt: skip
        return losses

    reference = validation_losses(alpha, reference_steps, "reference",
                                  ["--eval.every", str(reference_steps), "--checkpoint.every", "0"])  # fmt: skip
    say(f"reference ({reference_steps} steps): validation losses {_fmt(reference)}")
    result = DoReMiResult(weights={}, blend="", baseline=dict(alpha), reference_losses=reference)
    total = rounds * steps_per_round
    # Each round resumes the proxy's checkpoint with another blend (force_resume: data.path may change) on the
    # schedule of the whole T x s steps.
    proxy_flags = ["--eval.every", str(steps_per_round), "--checkpoint.every", str(steps_per_round),
                   "--optim.decay_steps", str(total), "--checkpoint.force_resume", "true"]  # fmt: skip
    for t in range(1, rounds + 1):
        proxy = validation_losses(alpha, t * steps_per_round, "proxy", proxy_flags)
        excess = clipped_excess(proxy, reference)
        updated = doremi_update(alpha, excess, eta, smoothing)
        result.rounds.append(DoReMiRound(dict(alpha), proxy, excess, updated))
        say(f"round {t}/{rounds}: proxy losses {_fmt(proxy)}, excess {_fmt(excess)} -> weights {_fmt(updated)}")
        alpha = updated
    result.weights = average_weights([r.weights for r in result.rounds])
    result.blend = blend_string(result.weights, train_prefixes)
    result.seconds = time.perf_counter() - t0
    return result


def _fmt(values: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {v:.4f}" for name, v in values.items())


USAGE_NOTE = ("Flags after -- go to the trainer (engine.train) for both models, e.g. -- --model.n_layers 2 "
              "--data.tokenizer byte --train.global_batch 8.")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    description = "DoReMi domain weights from a small proxy model trained with the engine; prints the blend."
    p = argparse.ArgumentParser(prog="python -m engine.data.curate doremi", description=description, epilog=USAGE_NOTE)
    p.add_argument("--domain", action="append", required=True, help="NAME=TRAIN_PREFIX of an indexed dataset (repeat)")
    p.add_argument("--valid", action="append", required=True, help="NAME=VALID_PREFIX, held out (one per domain)")
    p.add_argument("--run-dir", required=True, help="new directory for the reference and proxy runs")
    p.add_argument("--rounds", type=int, default=10, help="proxy rounds T (weight updates; default 10)")
    p.add_argument("--steps-per-round", type=int, default=50, help="proxy steps per round (default 50)")
    p.add_argument("--reference-steps", type=int, help="reference steps (default: rounds x steps per round)")
    p.add_argument("--eta", type=float, default=1.0, help="step size η of the weight update (default 1)")
    p.add_argument("--smoothing", type=float, default=1e-3, help="uniform smoothing c (default 1e-3)")
    p.add_argument("--baseline", help="baseline weights NAME=W,NAME=W for the reference and α_0 (default uniform)")
    p.add_argument("--launcher", default="", help="runs `-m engine.train` (default: this Python; or e.g. 'torchrun "
                   "--nproc-per-node 8')")  # fmt: skip
    p.add_argument("--output", help="also write the weights, losses and every round to this JSON file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    try:
        domains, valid = parse_domains(args.domain), parse_domains(args.valid)
        if set(valid) != set(domains):
            raise DoReMiError(f"--valid names {sorted(valid)} differ from the --domain names {sorted(domains)}")
        baseline = parse_weights(args.baseline) if args.baseline is not None else None
        result = run_doremi({name: (prefix, valid[name]) for name, prefix in domains.items()}, argv[split + 1 :],
                            args.run_dir, args.rounds, args.steps_per_round, baseline, args.reference_steps,
                            args.eta, args.smoothing, subprocess_trainer(args.launcher))  # fmt: skip
        if args.output:
            Path(args.output).write_text(json.dumps(asdict(result), indent=1) + "\n")
    except (ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {first}", file=sys.stderr)
        return 2
    for name, w in result.weights.items():
        print(f"{name}: weight {w:.4f} (baseline {result.baseline[name]:.4f})", file=sys.stderr)
    print(result.blend)
    return 0
