"""What both clients' captured steps share (client/torch/capture.py, client/native/capture.py): the cache of graphs by
guard key, the rule that turns recordings into a graph (two that agree; `RECORD_ATTEMPTS` that do not are a
CaptureError naming where they differ), and the Python values found not to matter (`_same_but_values`).

A client's `CapturedStep` subclasses `StepCache`: it records a call (its own way) into a `Built`
(client/capture_record.py) and hands it to `_settle`; it defines a graph (`_define`), lets one go (`_release`) and
replays one, each on its own device. A graph is any object with `valid`, `built` and `key`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._pytree import SUPPORTED_NODES, tree_flatten

from . import capture_guard as guard
from .capture_record import Built, CaptureError, compare

log = logging.getLogger("gpupool.torch")
_spec_numbers = itertools.count(1)  # StepCache._spec_id
RECORD_ATTEMPTS = 3  # recordings that may disagree before the step is declared uncapturable
MAX_GRAPHS = 16  # graphs one captured step keeps (the daemon holds at most 32 per session)
# Why two recordings of a step differ where parameters had a `.grad` at one's call and none at the other's (`_settle`)
GRADS_DIFFER = (
    "the parameters' `.grad`s were None at one call (`zero_grad()` before it) and kept at the other, which the step "
    "adds to (gradient accumulation: `zero_grad()` every few calls), and one graph cannot replay both. Capture the "
    "whole accumulation window as one step (its micro-batches' forward and backward, then `opt.step()` and "
    "`opt.zero_grad()`), or zero the gradients in place (`opt.zero_grad(set_to_none=False)`): one graph then adds "
    "to them every call"
)
# Why a graph is recorded anew at a call (`_note_grads`): a parameter's `.grad` that eagerly the step would add to
NOT_AS_RECORDED = (
    "a parameter's `.grad` is not as the recorded step found it (a `.grad` the step would add to, where the recording "
    "began without one: `opt.zero_grad()` before every call, or inside the step)"
)


class StepCache:
    """One graph per guard key (argument shapes and values, module flags, optimizer settings, Python values the
    step reads), like a compiler's cache; `stats` counts eager, recorded and replayed calls and graphs defined."""

    def __init__(
        self, fn: Callable[..., Any], device: Any = None, watch: Iterable[Any] = (), max_graphs: int = MAX_GRAPHS
    ) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = getattr(fn, "__name__", "step")
        self.device = device
        self.watched = list(watch) or guard.discover(fn)
        self._watch = guard.Watch(self.watched)  # watch_key(self.watched), remade only when it may have changed
        self.values = guard.python_values(fn)  # name -> reader of a plain Python value the step reads
        self.max_graphs = max_graphs
        self.graphs: dict[Any, Any] = {}  # by guard key, least recently used first
        # key -> (last recording, recordings that disagreed, `_no_grad` as it began)
        self._recorded: dict[Any, tuple[Built, int, frozenset[int]]] = {}
        self._first = True
        self.stats = {"eager": 0, "recorded": 0, "replayed": 0, "defined": 0, "rerecorded": 0}
        # A guard key holds its call's argument structure as a small number: hashing and comparing a TreeSpec
        # runs Python per node, and a key is hashed on every call. One number per structure seen.
        self._spec_ids: dict[Any, int] = {}
        self._arity: dict[int, tuple[Any, int]] = {}  # positional tensor arguments only: n -> (spec, its number)
        # `_lookup`'s short way: (structure, leaves' check, key, graph) of the last call that found a valid graph
        # with leaves `guard.tensors_check` checks; each key's check, made once (`_checks`)
        self._last: tuple[int, Any, Any, Any] | None = None
        self._checks: dict[Any, Any] = {}
        self._told: set[str] = set()  # what `_level` has logged at INFO once
        self._no_grad: set[int] = set()  # parameters (by id) without a `.grad` when the last recording began
        self._busy = threading.Lock()  # held by the call under way (each client's `__call__`: `_busy_why`)

    def kept_params(self) -> list[torch.Tensor]:
        """The parameters with a `.grad` of the modules and optimizers the step uses (`watched`): where a graph writes
        one's `.grad` (a new gradient a step: `zero_grad(set_to_none=True)`), a replay moves it off a storage an alias
        the script keeps shares, and leaves a new `.grad` where the script holds the old one (`g = p.grad`), so that
        the alias and `g` keep their values, as eagerly (native_client.cpp `move_kept`); where the script set `p.grad`
        to None between steps (`opt.zero_grad()` outside the step), the replay gives it back (round 55)."""
        return [p for p in self._params() if p.grad is not None]

    def _params(self) -> list[torch.Tensor]:
        params: dict[int, torch.Tensor] = {}
        for w in self.watched:
            if isinstance(w, torch.nn.Module):
                params.update((id(p), p) for p in w.parameters())
            elif isinstance(w, torch.optim.Optimizer):
                params.update((id(p), p) for group in w.param_groups for p in group["params"])
        return list(params.values())

    def _note_grads(self) -> None:
        """Before a recording: which parameters have no `.grad` as it starts (`opt.zero_grad()` before the call). A
        graph that makes one's `.grad` anew where the recording began without one is replayed only while it has none
        at the call (then given back): a `.grad` the step would add to eagerly (no `zero_grad()` since the last step)
        makes the step record again (the graphs' `fresh`)."""
        self._no_grad = {id(p) for p in self._params() if p.grad is None}

    def _cleared(self) -> list[weakref.ref[torch.Tensor]]:
        """At a graph's definition, just after the recording it is made of: the parameters that had a `.grad` when it
        began and have none now (the step adds to the gradients, then `opt.step()` and `opt.zero_grad()`: gradient
        accumulation whose update call is a graph of its own). Its replays set their `.grad` to None after the run, as
        eagerly (round 56: they left the gradient there, which the next call's graph then added to)."""
        return [weakref.ref(p) for p in self._params() if p.grad is None and id(p) not in self._no_grad]

    @property
    def state(self) -> str:
        return "replay" if self.graphs else ("eager" if self._first else "record")

    def _structure(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], Any, int]:
        """tree_flatten((args, kwargs)), and the number standing for its spec in guard keys. Positional tensor
        arguments only (the usual step): the spec depends on their count alone, so it is built once per count."""
        if not kwargs:
            for x in args:
                if not isinstance(x, torch.Tensor) or type(x) in SUPPORTED_NODES:
                    break
            else:
                found = self._arity.get(len(args))
                if found is None:
                    spec = tree_flatten((args, kwargs))[1]
                    found = self._arity[len(args)] = (spec, self._spec_id(spec))
                return list(args), found[0], found[1]
        leaves, spec = tree_flatten((args, kwargs))
        return leaves, spec, self._spec_id(spec)

    def _spec_id(self, spec: Any) -> int:
        found = self._spec_ids.get(spec)
        if found is None:
            if len(self._spec_ids) >= 4 * MAX_GRAPHS:  # structures that never repeat: numbers are never reused
                self._spec_ids.clear()
                self._arity.clear()
            found = self._spec_ids[spec] = next(_spec_numbers)
        return found

    def _busy_why(self) -> str:
        """Why a call is refused while another is under way: each client's `__call__` takes `_busy` without waiting
        (round 56: documented, not guarded, until then), so that a call from another thread (recording, replaying, or
        eager) is a CaptureError, not a recording of both threads' ops or a replay amid another's recording."""
        return (
            f"{self.name} was called while a call of it is under way (from another thread, or from inside the step): "
            "a captured step runs one call at a time; call it from one thread, or hold a lock around its calls"
        )

    # ---- each client's own ----

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def _define(self, where: Any, key: Any, built: Built, result: Any) -> None:
        raise NotImplementedError

    def _release(self, g: Any, drop: bool) -> None:
        raise NotImplementedError

    # ---- shared ----

    def _key(self, structure: int, leaves: list[Any]) -> Any:
        """The guard key of a call (client/capture_guard.py)."""
        return (
            structure,
            tuple(map(guard.leaf_key, leaves)),
            self._watch.key(),
            guard.values_key(self.values),
        )

    def _lookup(self, structure: int, leaves: list[Any], device: Any = None) -> tuple[Any, Any]:
        """(the call's guard key, its valid graph or None), the graph now the most recently used: `_graph_for(key,
        device)`, or `_valid_graph(key)` (silently) where `device` is None. The short way (round 47): where the last
        call that found a graph had the same structure and plain CPU tensor leaves, and this call's leaves pass
        its check (`guard.tensors_check`: their keys are the same), that graph, still valid, still under that key
        (`_forget` ends the short way), and still the most recently used (any other goes through here), is the
        key's as long as the watched objects' and the Python values' parts are the same too: both read as ever."""
        last = self._last
        if last is not None and last[0] == structure:
            key, g = last[2], last[3]
            try:
                same = last[1](*leaves)
            except Exception:  # noqa: BLE001 - (cannot be: the same structure, the same count) the key
                same = False
            if same and g.valid and g.key is key and self._watch.key() == key[2]:
                if guard.values_key(self.values) == key[3]:
                    return key, g
        self._last = None
        key = self._key(structure, leaves)
        g = self._valid_graph(key) if device is None else self._graph_for(key, device)
        if g is not None:
            check = self._checks.get(key)
            if check is None:
                check = self._checks[key] = guard.tensors_check(leaves) or False
            if check:
                self._last = (structure, check, g.key, g)
        return key, g

    def _valid_graph(self, key: Any) -> Any:
        """The valid graph of `key` (now the most recently used), else None, silently (`_graph_for` then says why)."""
        g = self.graphs.get(key)
        if g is None or not g.valid:
            return None
        if len(self.graphs) > 1:
            self.graphs[key] = self.graphs.pop(key)  # most recently used
        return g

    def _graph_for(self, key: Any, device: Any) -> Any:
        """The valid graph of `key` (now the most recently used), or None: the call records (a graph whose
        tensors bound by identity went away is forgotten)."""
        g = self.graphs.get(key)
        if g is not None:
            if g.valid:
                if len(self.graphs) > 1:
                    self.graphs[key] = self.graphs.pop(key)  # most recently used
                return g
            log.info("%s: graph %d re-recorded: %s", device, g.graph_id, g.why)
            self.stats["rerecorded"] += 1
            self._forget(key)
        elif self.graphs and key not in self._recorded:
            level = self._level("new")
            log.log(level, "%s: %s records a new graph: %s%s", device, self.name, guard.difference(self.graphs, key),
                    "; further ones at DEBUG level" if level == logging.INFO else "")  # fmt: skip
        return None

    def _level(self, what: str) -> int:
        """The level of this step's log line of `what` ("new": a call records a new graph, "defined"): INFO the first
        time, DEBUG after (`stats` counts them). A step whose batches vary in shape (the sentiment example's lazy
        step: the rows a batch reads) logged a pair of INFO lines for each of a dozen graphs until round 53."""
        if what in self._told:
            return logging.DEBUG
        self._told.add(what)
        return logging.INFO

    def _eager_now(self) -> bool:
        """Whether this call is the first, which runs eagerly (the optimizer creates its state)."""
        if not self._first:
            return False
        self._first = False
        self.stats["eager"] += 1
        return True

    def _settle(self, where: Any, key: Any, built: Built, result: Any) -> Any:
        """A recording of the call with guard key `key` (on device `where`) is done: the graph is defined when it
        agrees with the previous recording of that key; `result` is the call's."""
        previous = self._recorded.get(key)
        if previous is None:
            same = self._same_but_values(key, built)
            if same is not None:  # as validated as the recordings of the graph it equals
                self._define(where, same, built, result)
            else:
                self._recorded[key] = (built, 0, frozenset(self._no_grad))
            return result
        mismatch = compare(previous[0], built)
        if mismatch:
            attempts = previous[1] + 1
            if attempts >= RECORD_ATTEMPTS:
                del self._recorded[key]
                if previous[2] != self._no_grad:  # `.grad`s None at one call, kept at the other
                    raise CaptureError(f"this step cannot be captured: recordings differ at {mismatch}: {GRADS_DIFFER}")
                raise CaptureError(
                    f"this step cannot be captured: two recordings differ at {mismatch}. Python numbers that change "
                    "from step to step would be replayed stale: make them tensors on the device (for Adam/AdamW: "
                    "capturable=True; a changing lr as a gpupool tensor), or pass them as tensor arguments"
                )
            self._recorded[key] = (built, attempts, frozenset(self._no_grad))
            return result
        del self._recorded[key]
        self._define(where, key, built, result)
        return result

    def _same_but_values(self, key: Any, built: Built) -> Any:
        """After a Python value the step reads changed: if a graph (or a pending recording) of the same call with
        other values recorded exactly this, those values do not matter to the step (a step counter). Stop
        watching them, replace that graph by one of this recording (the tensors it leaves behind have new
        handles) and return the key to define it under."""
        seen = [(k, g.built) for k, g in self.graphs.items() if g.valid]
        seen += [(k, b) for k, (b, _, _) in self._recorded.items()]
        for old_key, old_built in seen:
            if old_key[:3] != key[:3] or old_key[3] == key[3] or compare(old_built, built):
                continue
            changed = {name for (name, a), (_, b) in zip(old_key[3], key[3], strict=True) if a != b}
            log.info("%s does not depend on %s: no longer watched", self.name, ", ".join(sorted(changed)))
            for name in changed:
                self.values.pop(name, None)
            self._forget(old_key, drop=True)  # a pending recording's key is in no graph: nothing to forget
            graphs, self.graphs = self.graphs, {}
            for k, other in graphs.items():
                k2 = (*k[:3], tuple(p for p in k[3] if p[0] not in changed))
                if k2 in self.graphs or k2[:3] == key[:3] and k2[3] == guard.values_key(self.values):
                    self._release(other, drop=True)
                    continue
                other.key = k2
                self.graphs[k2] = other
            self._recorded.clear()
            self._checks.clear()  # (keyed by the old keys)
            return (*key[:3], guard.values_key(self.values))
        return None

    def _make_room(self) -> None:
        """Before a graph is defined: the least recently used ones go past `max_graphs`."""
        while len(self.graphs) >= self.max_graphs:
            self._forget(next(iter(self.graphs)), drop=True)

    def _forget(self, key: Any, drop: bool = False) -> None:
        self._last = None
        self._checks.pop(key, None)
        g = self.graphs.pop(key, None)
        if g is not None:
            self._release(g, drop)

    def drop(self) -> None:
        """Forget every graph (the daemon frees them); the next calls record again."""
        for key in list(self.graphs):
            self._forget(key, drop=True)
        self._recorded.clear()
