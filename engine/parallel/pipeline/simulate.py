"""Runs schedules' action lists on a model of the machine: each rank executes its list in order, a compute action
takes its cost, a send is asynchronous (an isend), a receive waits for its matching send. Used to check schedules
(no deadlock, the in-flight bound, the bubble against its closed form) without processes, and to explain them.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.parallel.pipeline.schedules import SPLIT_BACKWARD, Action, build_schedule, stage_of


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


def simulate(
    name: str, pp: int, virtual_stages: int, micro_batches: int, f: float = 1.0, b: float = 1.0, w: float = 1.0
) -> Simulation:
    """Executes `name`'s action lists for every rank. Costs per chunk: f (forward), b (input gradient), w (weight
    gradient); a schedule without a split backward runs b + w in its B."""
    v = virtual_stages
    lists = [build_schedule(name, pp, v, micro_batches, r) for r in range(pp)]
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
                if a.kind.startswith("RECV"):
                    key = _peer(a, r, pp)
                    if key not in sent:
                        break
                    clock[r] = max(clock[r], sent[key])
                elif a.kind.startswith("SEND"):
                    sent[(a.kind, stage_of(a.chunk, r, pp), a.micro)] = clock[r]
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
