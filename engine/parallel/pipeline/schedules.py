"""Pipeline schedules as data: a pure function (pp, virtual_stages, micro_batches, rank) -> this rank's actions.

A rank holds `virtual_stages` model chunks; chunk c of rank r is global stage c * pp + r (Megatron's interleaved
layout; with one chunk, stage = rank). Actions, executed in order by one runner:
  F(c, i)        forward of chunk c on micro-batch i
  B(c, i)        backward of chunk c on micro-batch i: the whole backward, or with a split backward (ZB-H1) only the
                 input gradient
  W(c, i)        weight gradient of chunk c on micro-batch i (split-backward schedules only)
  RECV_F/SEND_F  the activation coming from the previous stage / going to the next one, around an F
  RECV_B/SEND_B  the gradient coming from the next stage / going to the previous one, around a B
The runner posts point-to-point actions in exchanges (`build_exchanges`), each one batch (`batch_isend_irecv`): e.g.
1F1B's "send this activation, receive that gradient". A backend that pairs messages by order and makes a send wait
for its receive (NCCL) needs both: the messages between two ranks are sent and received in the same order in every
schedule here, and with exchanges posted whole no rank's send waits on a receive its peer posts only after a send
of its own (simulate.py's rendezvous mode checks this).
Schedules (m = micro-batches, p = pp, v = virtual_stages):
  gpipe        every forward, then every backward (Huang et al. 2019); m micro-batches in flight.
  1f1b         p - r - 1 warm-up forwards, then one forward, one backward (PipeDream-Flush, Narayanan et al. 2021);
               at most p - r in flight on rank r.
  interleaved  1F1B over v chunks per rank, micro-batches in groups of p (Narayanan et al. 2021, sec. 2.2);
               needs m divisible by p; bubble (p - 1) / (v m + p - 1).
  zb           ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B's order of F and B with B the input
               gradient only, each W deferred by r steady-state iterations on rank r (the placement torch's
               pipelining uses too); at most p micro-batches held per rank, as 1F1B's first stage. With F = B = W
               the bubble is (p - 1) / (3m + p - 1) for m >= p, a third of 1F1B's.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ConfigError

COMPUTE = ("F", "B", "W")
COMM = ("RECV_F", "SEND_F", "RECV_B", "SEND_B")


@dataclass(frozen=True)
class Action:
    kind: str  # one of COMPUTE + COMM
    chunk: int  # the rank's model chunk (0 .. virtual_stages - 1)
    micro: int  # the micro-batch

    def __repr__(self) -> str:
        return f"{self.kind}{self.chunk}.{self.micro}"


def stage_of(chunk: int, rank: int, pp: int) -> int:
    """The global pipeline stage of a rank's chunk."""
    return chunk * pp + rank


def check_schedule(name: str, pp: int, virtual_stages: int, micro_batches: int) -> None:
    """One-line ConfigError for a schedule that cannot run as asked."""
    if name not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule must be one of {'|'.join(SCHEDULES)}, got '{name}'")
    sizes = (("parallel.pp", pp), ("parallel.virtual_stages", virtual_stages), ("micro-batches", micro_batches))
    for key, value in sizes:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if name != "interleaved" and virtual_stages != 1:
        raise ConfigError(f"parallel.virtual_stages {virtual_stages} needs --parallel.pp_schedule interleaved")
    if name == "interleaved" and micro_batches % pp:
        raise ConfigError(
            f"the interleaved schedule needs micro-batches divisible by parallel.pp: {micro_batches} micro-batches "
            f"over pp {pp} (set train.micro_batch so that global_batch / (micro_batch x dp) is a multiple of {pp})"
        )


def _with_comm(compute: list[Action], pp: int, virtual_stages: int, rank: int) -> list[Action]:
    """Inserts the receives before and the sends after each F and B that crosses a stage boundary."""
    last = pp * virtual_stages - 1
    out = []
    for a in compute:
        s = stage_of(a.chunk, rank, pp)
        if a.kind == "F":
            if s > 0:
                out.append(Action("RECV_F", a.chunk, a.micro))
            out.append(a)
            if s < last:
                out.append(Action("SEND_F", a.chunk, a.micro))
        elif a.kind == "B":
            if s < last:
                out.append(Action("RECV_B", a.chunk, a.micro))
            out.append(a)
            if s > 0:
                out.append(Action("SEND_B", a.chunk, a.micro))
        else:
            out.append(a)
    return out


def _gpipe(pp: int, v: int, m: int, rank: int) -> list[Action]:
    return [Action("F", 0, i) for i in range(m)] + [Action("B", 0, i) for i in range(m)]


def _one_f_one_b(pp: int, v: int, m: int, rank: int) -> list[Action]:
    warmup = min(pp - rank - 1, m)
    out = [Action("F", 0, i) for i in range(warmup)]
    for i in range(m - warmup):
        out += [Action("F", 0, warmup + i), Action("B", 0, i)]
    return out + [Action("B", 0, i) for i in range(m - warmup, m)]


def _interleaved(pp: int, v: int, m: int, rank: int) -> list[Action]:
    """Megatron's interleaved 1F1B: the k-th forward is micro-batch (k // (p v)) p + k % p of chunk (k // p) % v;
    backwards go through the chunks in reverse."""
    total = v * m

    def fwd(k: int) -> Action:
        return Action("F", (k // pp) % v, (k // (pp * v)) * pp + k % pp)

    def bwd(k: int) -> Action:
        return Action("B", v - 1 - (k // pp) % v, (k // (pp * v)) * pp + k % pp)

    warmup = min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    out = [fwd(k) for k in range(warmup)]
    for k in range(total - warmup):
        out += [fwd(warmup + k), bwd(k)]
    return out + [bwd(k) for k in range(total - warmup, total)]


def _zb_h1(pp: int, v: int, m: int, rank: int) -> list[Action]:
    """1F1B's F and B (B the input gradient) with each W deferred: rank r runs its first r steady-state iterations
    as F, B only, then F, B, W(oldest pending), the cooldown as B, W, and the Ws still pending last. The deferred Ws
    fill the time rank r would wait for gradients, and r + (p - r) = p micro-batches are held at most."""
    warmup = min(pp - rank - 1, m)
    out = [Action("F", 0, i) for i in range(warmup)]
    pending: list[int] = []
    for k in range(m - warmup):
        out += [Action("F", 0, warmup + k), Action("B", 0, k)]
        pending.append(k)
        if k >= rank:
            out.append(Action("W", 0, pending.pop(0)))
    for i in range(m - warmup, m):
        out.append(Action("B", 0, i))
        pending.append(i)
        out.append(Action("W", 0, pending.pop(0)))
    return out + [Action("W", 0, i) for i in pending]


def comm_groups(actions: list[Action], fuse_forward_backward: bool = False) -> list[Action | tuple[Action, ...]]:
    """The action list with the point-to-point actions between two computes as one tuple: an exchange posted at
    once. `fuse_forward_backward`: an F directly followed by a B is one unit, as in Megatron's interleaved steady state
    (its send_forward_backward_recv_forward_backward): the B's receive joins the exchange before the F and the F's
    send the exchange after the B, so no exchange sits between them."""
    runs: list[list[Action]] = [[]]  # runs[t]: the point-to-point actions before compute t
    computes: list[Action] = []
    for a in actions:
        if a.kind in COMM:
            runs[-1].append(a)
        else:
            computes.append(a)
            runs.append([])
    if fuse_forward_backward:
        for t in range(len(computes) - 1):
            if computes[t].kind == "F" and computes[t + 1].kind == "B" and runs[t + 1]:
                between, runs[t + 1] = runs[t + 1], []
                runs[t] += [a for a in between if a.kind.startswith("RECV")]
                runs[t + 2] = [a for a in between if a.kind.startswith("SEND")] + runs[t + 2]
    out: list[Action | tuple[Action, ...]] = []
    for run, compute in zip(runs, computes):
        if run:
            out.append(tuple(run))
        out.append(compute)
    if runs[-1]:
        out.append(tuple(runs[-1]))
    return out


def build_exchanges(name: str, pp: int, virtual_stages: int, micro_batches: int, rank: int) -> list:
    """This rank's actions with its point-to-point actions grouped into exchanges, as the runner posts them.
    Per compute for every schedule except interleaved with more micro-batches than stages, which takes Megatron's
    F-B units; each choice is the one simulate.py's rendezvous model runs without deadlock (tested over pp <= 8,
    m <= 32: per-compute exchanges deadlock there, through the wrap-around from the last stage to the first)."""
    actions = build_schedule(name, pp, virtual_stages, micro_batches, rank)
    return comm_groups(actions, fuse_forward_backward=name == "interleaved" and micro_batches > pp)


SCHEDULES = {"gpipe": _gpipe, "1f1b": _one_f_one_b, "interleaved": _interleaved, "zb": _zb_h1}
SPLIT_BACKWARD = frozenset({"zb"})  # schedules whose B is the input gradient only, with a separate W


def build_schedule(name: str, pp: int, virtual_stages: int, micro_batches: int, rank: int) -> list[Action]:
    """This rank's action list (compute and point-to-point) for a schedule; see the module docstring."""
    check_schedule(name, pp, virtual_stages, micro_batches)
    if not 0 <= rank < pp:
        raise ConfigError(f"pipeline rank {rank} is outside 0..{pp - 1}")
    return _with_comm(SCHEDULES[name](pp, virtual_stages, micro_batches, rank), pp, virtual_stages, rank)
