"""Feeds one stream of tensors to several sinks by name prefix (e.g. main model + MTP draft)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ...frameworks import Framework
from ...protocol.errors import ConfigError, ManifestMismatch
from .base import NameGroups, ParamSpecs, as_sink, name_groups_of


class PrefixRouter:
    """Routes ``name`` to the sink of the longest matching prefix, with the prefix STRIPPED.

    ``PrefixRouter({"mtp.": mtp_sink}, default=main_sink)``: ``"mtp.layers.0.w"`` reaches
    ``mtp_sink`` as ``"layers.0.w"``; any other name reaches ``main_sink`` unchanged. A
    name no route matches and no default takes raises ManifestMismatch. Children are
    anything :func:`as_sink` accepts and must have ``load_one``: the router streams in a
    single pass over its input, handing each tensor to its child while the view is
    valid, never buffering a model. All children must want the same framework.
    """

    def __init__(self, routes: Mapping[str, Any], default: Any | None = None) -> None:
        # Longest prefix first so "mtp.head." wins over "mtp.".
        self.routes: dict[str, Any] = {
            p: as_sink(s) for p, s in sorted(routes.items(), key=lambda kv: len(kv[0]), reverse=True)
        }
        self.default = None if default is None else as_sink(default)
        children = [*self.routes.values(), *([self.default] if self.default is not None else [])]
        if not children:
            raise ConfigError(
                "PrefixRouter: expected at least one route or a default, got none; fix: pass routes"
            )
        for sink in children:
            if not callable(getattr(sink, "load_one", None)):
                raise ConfigError(
                    "PrefixRouter: expected sinks with load_one(name, tensor), "
                    f"got {type(sink).__qualname__} without it; "
                    "fix: add load_one (load_weights can loop over it) so the router can stream"
                )
        frameworks = {s.framework for s in children}
        if len(frameworks) != 1:
            raise ConfigError(
                f"PrefixRouter: expected all sinks to want one framework, got {sorted(frameworks)}; "
                "fix: use sinks of one framework per router (one ReceiverDaemon per framework)"
            )
        self.framework: Framework = frameworks.pop()
        self.direct_copy = all(getattr(s, "direct_copy", False) is True for s in children)

    def route(self, name: str) -> tuple[Any, str]:
        """The sink ``name`` goes to and the name it sees there."""
        for prefix, sink in self.routes.items():
            if name.startswith(prefix):
                return sink, name[len(prefix) :]
        if self.default is None:
            raise ManifestMismatch(
                f"tensor {name!r}: expected a name starting with one of {list(self.routes)} (no default sink), "
                "got none of them; fix: add a route for it or pass default= to PrefixRouter"
            )
        return self.default, name

    def param_specs(self) -> ParamSpecs:
        specs: ParamSpecs = {}
        if self.default is not None:
            # Default names shadowed by a route prefix are unreachable, so not part of the model.
            specs.update(
                (n, s) for n, s in self.default.param_specs().items() if not any(n.startswith(p) for p in self.routes)
            )
        for prefix, sink in self.routes.items():
            for n, s in sink.param_specs().items():
                full = prefix + n
                if self.route(full)[0] is sink:  # a longer prefix may claim it
                    specs[full] = s
        return specs

    def name_groups(self) -> NameGroups:
        """Each child's tied, optional and unmaterialised names under the prefix that reaches it."""
        tied: dict[str, Any] = {}
        optional: set[str] = set()
        meta: set[str] = set()
        children = [*self.routes.items(), *([("", self.default)] if self.default is not None else [])]
        for prefix, sink in children:
            child_tied, child_optional, child_meta = name_groups_of(sink)

            def reach(n: str, p: str = prefix, s: Any = sink) -> bool:  # shadowed names excluded
                return self.route(p + n)[0] is s

            tied.update((prefix + n, (prefix, key)) for n, key in child_tied.items() if reach(n))
            optional.update(prefix + n for n in child_optional if reach(n))
            meta.update(prefix + n for n in child_meta if reach(n))
        return tied, frozenset(optional), frozenset(meta)

    def unmaterialised(self) -> list[str]:
        found = []
        for prefix, sink in [*self.routes.items(), *([("", self.default)] if self.default is not None else [])]:
            check = getattr(sink, "unmaterialised", None)
            found += [prefix + n for n in check()] if callable(check) else []
        return found

    def load_one(self, name: str, tensor: Any) -> None:
        sink, inner = self.route(name)
        sink.load_one(inner, tensor)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        for name, tensor in weights:
            self.load_one(name, tensor)

    def destination(self, name: str) -> np.ndarray | None:
        try:
            sink, inner = self.route(name)
        except ManifestMismatch:
            return None
        dest = getattr(sink, "destination", None)
        return dest(inner) if callable(dest) else None
