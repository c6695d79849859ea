"""Pipeline schedules as data, checked without processes: dependencies in order, sends matching receives, no
deadlock in a simulated run, the in-flight bound, and the bubble of a unit-cost simulation against its closed form."""

from collections import Counter
from fractions import Fraction

import pytest

from engine.config import ConfigError
from engine.parallel.pipeline import schedules
from engine.parallel.pipeline.schedules import SPLIT_BACKWARD, build_schedule, stage_of
from engine.parallel.pipeline.simulate import DeadlockError, simulate

CASES = [
    (name, pp, v, m)
    for name, vs in (("gpipe", (1,)), ("1f1b", (1,)), ("interleaved", (1, 2, 3)), ("zb", (1,)))
    for v in vs
    for pp in (2, 3, 4)
    for m in (1, 2, 3, 4, 8)
    if name != "interleaved" or m % pp == 0
]


def _bubble(name, pp, v, m):
    """The closed form: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(vm+p-1) interleaved, (p-1)/(3m+p-1) ZB-H1."""
    if name == "zb":
        return Fraction(pp - 1, 3 * m + pp - 1)
    return Fraction(pp - 1, v * m + pp - 1)


def _in_flight_bound(name, pp, v, m, rank):
    if name == "gpipe":
        return m
    if name == "1f1b":
        return min(pp - rank, m)
    if name == "interleaved":  # Megatron's warm-up plus the steady state's one
        return min((pp - rank - 1) * 2 + (v - 1) * pp + 1, v * m)
    return min(pp, m)  # zb: the deferred weight gradients hold at most p micro-batches


@pytest.mark.parametrize("name, pp, v, m", CASES)
def test_schedule_properties(name, pp, v, m):
    lists = [build_schedule(name, pp, v, m, r) for r in range(pp)]
    split = name in SPLIT_BACKWARD
    sends, recvs = Counter(), Counter()
    for rank, actions in enumerate(lists):
        position = {}
        for i, a in enumerate(actions):
            key = (a.kind, a.chunk, a.micro)
            assert key not in position, f"{name} rank {rank}: {a!r} twice"
            position[key] = i
            s = stage_of(a.chunk, rank, pp)
            if a.kind in ("SEND_F", "RECV_F", "SEND_B", "RECV_B"):
                # (direction, receiving stage, micro): a forward send goes to s + 1, a backward send to s - 1
                target = {"SEND_F": s + 1, "RECV_F": s, "SEND_B": s - 1, "RECV_B": s}[a.kind]
                (sends if a.kind.startswith("SEND") else recvs)[(a.kind[-1], target, a.micro)] += 1
        for c in range(v):
            for i in range(m):
                assert position[("F", c, i)] < position[("B", c, i)], f"{name} rank {rank}: B before F"
                if split:
                    assert position[("B", c, i)] < position[("W", c, i)], f"{name} rank {rank}: W before B"
                else:
                    assert ("W", c, i) not in position
    assert sends == recvs and all(n == 1 for n in sends.values())
    assert len(sends) == 2 * (pp * v - 1) * m  # every stage boundary, both directions, every micro-batch
    sim = simulate(name, pp, v, m)  # raises DeadlockError if the lists cannot run
    for rank in range(pp):
        assert sim.peak_in_flight[rank] <= _in_flight_bound(name, pp, v, m, rank), (rank, sim.peak_in_flight)
    if name != "zb" or m >= pp:
        expected = _bubble(name, pp, v, m)
        for frac in sim.bubble_fraction:
            assert Fraction(frac).limit_denominator(10_000) == expected, (sim.bubble_fraction, float(expected))


def test_zb_h1_bubble_is_a_third_of_1f1b_at_equal_memory():
    one, zb = simulate("1f1b", 4, 1, 8), simulate("zb", 4, 1, 8)
    assert zb.makespan == 3 * 8 + 3 and one.makespan == 3 * 8 + 3 * 3
    assert max(zb.peak_in_flight) == max(one.peak_in_flight) == 4


def test_interleaving_shrinks_the_bubble_by_v():
    assert simulate("interleaved", 4, 2, 8).makespan == 3 * 2 * 8 + 3 * 3  # chunk costs 1/v of a stage's: in units
    assert simulate("1f1b", 4, 1, 8).makespan == 3 * 8 + 3 * 3  # of a chunk, the bubble 3(p-1) is 1/v as long


def test_simulator_finds_a_deadlock(monkeypatch):
    """Rank 0 waiting for a gradient before sending the activation that would produce it is caught, not hung; so is
    a backward listed before its own forward."""
    real = schedules.SCHEDULES["gpipe"]

    def backward_first(pp, v, m, r):
        actions = real(pp, v, m, r)
        return actions[m:] + actions[:m] if r == 0 else actions

    monkeypatch.setitem(schedules.SCHEDULES, "gpipe", backward_first)
    with pytest.raises(DeadlockError, match="wait forever"):
        simulate("gpipe", 2, 1, 2)
    monkeypatch.setitem(schedules.SCHEDULES, "gpipe", lambda pp, v, m, r: real(pp, v, m, r)[::-1])
    with pytest.raises(ValueError, match="before its forward"):
        simulate("gpipe", 2, 1, 2)


@pytest.mark.parametrize(
    "args, needle",
    [
        (("pipedream", 2, 1, 4), "parallel.pp_schedule must be one of gpipe|1f1b|interleaved|zb"),
        (("interleaved", 4, 2, 6), "needs micro-batches divisible by parallel.pp: 6 micro-batches over pp 4"),
        (("1f1b", 2, 2, 4), "parallel.virtual_stages 2 needs --parallel.pp_schedule interleaved"),
        (("1f1b", 0, 1, 4), "parallel.pp must be a positive integer"),
        (("gpipe", 2, 1, 0), "micro-batches must be a positive integer"),
    ],
)
def test_bad_schedules_are_one_line(args, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        build_schedule(*args, rank=0)
    assert "\n" not in str(e.value)


NCCL_CASES = [
    (name, pp, v, m)
    for name, vs in (("gpipe", (1,)), ("1f1b", (1,)), ("interleaved", (2, 3)), ("zb", (1,)))
    for v in vs
    for pp in (2, 3, 4, 8)
    for m in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    if name != "interleaved" or m % pp == 0
]


def _messages(name, pp, v, m, rank, direction):
    """The (kind, receiving stage, micro) of the messages this rank sends ('SEND') or receives ('RECV'), by peer,
    in the order of its action list."""
    out: dict[int, list] = {}
    for a in build_schedule(name, pp, v, m, rank):
        if not a.kind.startswith(direction):
            continue
        s = stage_of(a.chunk, rank, pp)
        fwd = a.kind.endswith("F")
        if direction == "SEND":
            to = s + 1 if fwd else s - 1
            out.setdefault(to % pp, []).append(("F" if fwd else "B", to, a.micro))
        else:
            frm = s - 1 if fwd else s + 1
            out.setdefault(frm % pp, []).append(("F" if fwd else "B", s, a.micro))
    return out


@pytest.mark.parametrize("name, pp, v, m", NCCL_CASES)
def test_schedules_run_on_a_backend_that_pairs_by_order_and_blocks_sends(name, pp, v, m):
    """NCCL pairs the messages between two ranks by their order, and a large send waits for its receive. Every
    schedule sends and receives the messages between each pair of ranks in the same order, and its exchanges
    (build_exchanges) run to the end in the simulator's rendezvous model."""
    for r in range(pp):
        for peer, sent in _messages(name, pp, v, m, r, "SEND").items():
            assert sent == _messages(name, pp, v, m, peer, "RECV").get(r), f"{name} rank {r} -> {peer}: order differs"
    sim = simulate(name, pp, v, m, rendezvous=True)  # raises DeadlockError
    assert sim.makespan >= simulate(name, pp, v, m).makespan  # waiting on sends never makes a step shorter


def test_interleaved_needs_forward_backward_exchanges(monkeypatch):
    """Posted one exchange per compute, interleaved 1F1B with more micro-batches than stages deadlocks when sends wait
    for their receives (through the wrap-around from the last stage to the first); Megatron's F-B units do not."""
    simulate("interleaved", 2, 2, 4, rendezvous=True)
    real = schedules.comm_groups
    monkeypatch.setattr(schedules, "comm_groups", lambda actions, fuse_forward_backward=False: real(actions))
    with pytest.raises(DeadlockError, match="wait forever"):
        simulate("interleaved", 2, 2, 4, rendezvous=True)
    with pytest.raises(DeadlockError, match="wait forever"):
        simulate("interleaved", 4, 2, 8, rendezvous=True)
