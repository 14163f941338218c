"""Periodic work of the training loop, as hooks: `hooks.add(fn, when)` registers `fn(step)` to
run after every step for which `when(step)` is True (levanter's `add_hook(fn, every=n)`;
`itstime` is big_vision's helper of the same name). The loop runs them in the order added."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional


def itstime(step: int, every: int, last: Optional[int] = None) -> bool:
    """True at every multiple of `every` (never when `every` <= 0), and at step `last`."""
    return (every > 0 and step % every == 0) or step == last


@dataclasses.dataclass
class Hook:
    name: str
    fn: Callable[[int], None]
    when: Callable[[int], bool]


class Hooks:
    """The loop's hooks, in order. `run(step)` says whether any ran (their time is not training
    time)."""

    def __init__(self):
        self.hooks: list[Hook] = []

    def add(self, name: str, fn: Callable[[int], None], when: Callable[[int], bool]) -> None:
        self.hooks.append(Hook(name, fn, when))

    def run(self, step: int) -> bool:
        ran = False
        for hook in self.hooks:
            if hook.when(step):
                hook.fn(step)
                ran = True
        return ran
