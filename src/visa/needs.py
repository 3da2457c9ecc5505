"""Which agent reads which: an agent's ``needs`` resolved into the order the agents run in.

An agent lists in ``needs`` the columns of other agents it reads (``<score>.<agent>`` for a primary
value, ``<score>.<agent>.<field>`` for another output). Only image agents produce columns that others
can read, and only the fields they return from ``score_batch`` (``outputs``; a value that
``finalize`` derives over the whole pool does not exist yet while scoring). Sample agents read image
agents; image agents may read other image agents (the DP judge reads the tagger's and the image
statistics' results instead of computing them again).

:func:`order_by_needs` puts every image agent after the image agents it reads, keeping the recipe's
order where the needs leave a choice, then the sample agents in recipe order. A need that no image
agent of the recipe produces, and agents that need each other (a cycle), are recipe errors, raised
when the recipe is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from visa.agents.base import Unit

if TYPE_CHECKING:
    from visa.recipe import BoundAgent


class NeedsError(ValueError):
    """A need that cannot be met (missing producer, or a cycle); the message is one line."""


def producers(agents: Sequence[BoundAgent]) -> dict[str, tuple[BoundAgent, str]]:
    """Column -> (the image agent that produces it, its output field), for every image agent's outputs."""
    found: dict[str, tuple[BoundAgent, str]] = {}
    for bound in agents:
        if bound.agent.unit == Unit.IMAGE:
            for field_name in bound.agent.outputs:
                found[bound.column_of(field_name)] = (bound, field_name)
    return found


def upstream(agents: Sequence[BoundAgent], recipe: str) -> dict[str, list[BoundAgent]]:
    """Agent column -> the image agents it reads, in the order of its ``needs``; raises NeedsError."""
    made = producers(agents)
    out: dict[str, list[BoundAgent]] = {}
    for bound in agents:
        reads: list[BoundAgent] = []
        for column in bound.agent.needs:
            if column not in made:
                raise NeedsError(
                    f"agent {bound.column} needs column '{column}', which no image agent of recipe '{recipe}' "
                    "produces"
                )
            producer = made[column][0]
            if producer not in reads:
                reads.append(producer)
        out[bound.column] = reads
    return out


def order_by_needs(agents: Sequence[BoundAgent], recipe: str) -> list[BoundAgent]:
    """Image agents in dependency order (recipe order among equals), then the sample agents.

    Raises NeedsError for a need no image agent meets and for image agents that need each other.
    """
    reads = upstream(agents, recipe)
    images = [b for b in agents if b.agent.unit == Unit.IMAGE]
    ordered: list[BoundAgent] = []
    placed: set[str] = set()
    waiting = list(images)
    while waiting:
        ready = next((b for b in waiting if all(u.column in placed for u in reads[b.column])), None)
        if ready is None:
            raise NeedsError(f"recipe '{recipe}': {_cycle(waiting, reads)}")
        ordered.append(ready)
        placed.add(ready.column)
        waiting.remove(ready)
    return ordered + [b for b in agents if b.agent.unit != Unit.IMAGE]


def _cycle(waiting: Sequence[BoundAgent], reads: dict[str, list[BoundAgent]]) -> str:
    """A sentence naming one cycle among ``waiting`` (every one of them waits on another one)."""
    left = {b.column for b in waiting}
    path: list[str] = []
    current = waiting[0].column
    while current not in path:
        path.append(current)
        current = next(u.column for u in reads[current] if u.column in left)
    loop = path[path.index(current) :] + [current]
    if len(loop) == 2:
        return f"agent {loop[0]} needs its own output"
    return "agents need each other in a cycle: " + " -> ".join(loop)
