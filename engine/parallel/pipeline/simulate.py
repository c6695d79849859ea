"""Runs schedules' action lists on a model of the machine: each rank executes its list in order, a compute action
takes its cost, a send is asynchronous (an isend), a receive waits for its matching send. Used to check schedules
(no deadlock, the in-flight bound, the bubble against its closed form) without processes, and to explain them.

`rendezvous=True` models a backend whose send completes only once the peer has posted the receive (NCCL for
messages past its buffers): each rank posts an exchange (`build_exchanges`, as the runner batches them) whole and
goes on only when every send in it has met its receive and every receive its send. This is stricter than NCCL,
where the host runs ahead and only the exchanges on one pair of ranks are ordered, so a schedule that runs here
cannot deadlock there. Its makespan is pessimistic (a rank waits on its own sends); only the async model's is
compared with the closed forms.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.parallel.pipeline.schedules import SPLIT_BACKWARD, Action, build_exchanges, build_schedule, stage_of


class DeadlockError(RuntimeError):
    """Every unfinished rank waits on a receive whose send never comes."""


@dataclass
class Simulation:
    makespan: float
    busy: list[float]  # per rank
    peak_in_flight: list[int]  # per rank: most micro-batch chunks whose activations were held at once
    timeline: list[list[tuple[float, float, Action]]]  # per rank: (start, end, action) of compute actions

    @property
    def bubble_fraction(self) -> list[float]:
        """Idle time over the step time, per rank."""
        return [(self.makespan - b) / self.makespan for b in self.busy]


def _peer(a: Action, rank: int, pp: int) -> tuple[str, int, int]:
    """The key of the send a receive waits on: (kind, sending stage, micro)."""
    s = stage_of(a.chunk, rank, pp)
    if a.kind == "RECV_F":
        return ("SEND_F", s - 1, a.micro)
    return ("SEND_B", s + 1, a.micro)


def _send_key(a: Action, rank: int, pp: int) -> tuple[str, int, int]:
    return (a.kind, stage_of(a.chunk, rank, pp), a.micro)


def simulate(
    name: str,
    pp: int,
    virtual_stages: int,
    micro_batches: int,
    f: float = 1.0,
    b: float = 1.0,
    w: float = 1.0,
    rendezvous: bool = False,
) -> Simulation:
    """Executes `name`'s action lists for every rank. Costs per chunk: f (forward), b (input gradient), w (weight
    gradient); a schedule without a split backward runs b + w in its B. `rendezvous`: sends wait for their receives
    (see the module docstring)."""
    v = virtual_stages
    build = build_exchanges if rendezvous else build_schedule
    lists: list[list] = [build(name, pp, v, micro_batches, r) for r in range(pp)]
    posted: dict[tuple[str, int, int], float] = {}  # rendezvous: receives posted, by the key of their send
    split = name in SPLIT_BACKWARD
    cost = {"F": f, "B": b if split else b + w, "W": w}
    clock, pos = [0.0] * pp, [0] * pp
    sent: dict[tuple[str, int, int], float] = {}
    busy = [0.0] * pp
    held, peak = [0] * pp, [0] * pp
    ran: list[set[tuple[str, int, int]]] = [set() for _ in range(pp)]
    timeline: list[list[tuple[float, float, Action]]] = [[] for _ in range(pp)]
    while True:
        progressed = False
        for r in range(pp):
            while pos[r] < len(lists[r]):
                a = lists[r][pos[r]]
                if isinstance(a, tuple):  # an exchange: posted whole, done when each message has both ends
                    waits = []
                    for op in a:
                        table, other = (sent, posted) if op.kind.startswith("SEND") else (posted, sent)
                        key = _send_key(op, r, pp) if op.kind.startswith("SEND") else _peer(op, r, pp)
                        progressed |= key not in table
                        table.setdefault(key, clock[r])
                        waits.append((other, key))
                    if any(key not in other for other, key in waits):
                        break
                    clock[r] = max([clock[r]] + [other[key] for other, key in waits])
                elif a.kind.startswith("RECV"):
                    key = _peer(a, r, pp)
                    if key not in sent:
                        break
                    clock[r] = max(clock[r], sent[key])
                elif a.kind.startswith("SEND"):
                    sent[_send_key(a, r, pp)] = clock[r]
                else:
                    need = {"B": "F", "W": "B"}.get(a.kind)
                    if need is not None and (need, a.chunk, a.micro) not in ran[r]:
                        raise ValueError(f"{name} rank {r}: {a!r} runs before its {'forward' if need == 'F' else 'B'}")
                    ran[r].add((a.kind, a.chunk, a.micro))
                    start = clock[r]
                    clock[r] += cost[a.kind]
                    busy[r] += cost[a.kind]
                    timeline[r].append((start, clock[r], a))
                    if a.kind == "F":
                        held[r] += 1
                        peak[r] = max(peak[r], held[r])
                    elif a.kind == ("W" if split else "B"):
                        held[r] -= 1
                pos[r] += 1
                progressed = True
        if all(pos[r] == len(lists[r]) for r in range(pp)):
            break
        if not progressed:
            stuck = {r: lists[r][pos[r]] for r in range(pp) if pos[r] < len(lists[r])}
            raise DeadlockError(f"{name} pp={pp} v={v} m={micro_batches}: ranks wait forever at {stuck}")
    return Simulation(max(clock), busy, peak, timeline)
