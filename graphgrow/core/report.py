"""Reports: what widening did to every channel space, and why a space stayed."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpaceReport:
    name: str
    old_width: int
    new_width: int
    producers: list
    consumers: list
    carriers: list
    frozen_reasons: list = field(default_factory=list)
    normalized: bool = False  # read by a norm across its channels (a residual stream): uniform or fill + rescale
    head_dim: int = 1  # > 1: cut into attention heads of this many channels, grown head by head

    @property
    def status(self) -> str:
        if self.new_width == self.old_width:
            return "frozen" if self.frozen_reasons else "unchanged"
        return "partly frozen" if self.frozen_reasons else "widened"

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["status"] = self.status
        return d


@dataclass
class GrowthReport:
    """Result of an analysis or a widening."""

    spaces: list
    params_before: int = 0
    params_after: int = 0
    function_preserving: bool = True
    opaque_leaves: list = field(default_factory=list)
    check: object = None
    rounds: int = 0
    notes: list = field(default_factory=list)
    not_preserving: str = "init=random-pad"  # what makes a non-preserving growth so (the summary names it)
    deviation: float | None = None  # a non-preserving growth's measured max_rel of the outputs, where measured

    @property
    def widened(self) -> list:
        return [s for s in self.spaces if s.new_width > s.old_width]

    @property
    def frozen(self) -> list:
        return [s for s in self.spaces if s.frozen_reasons]

    def frozen_reasons(self) -> dict:
        """reason -> number of spaces (fully or partly) frozen by it."""
        out: dict = {}
        for s in self.frozen:
            for r in s.frozen_reasons:
                out[r] = out.get(r, 0) + 1
        return out

    def summary(self) -> str:
        n = len(self.spaces)
        full = sum(1 for s in self.spaces if s.status == "frozen")
        line = (f"{len(self.widened)}/{n} channel spaces widened, {full} frozen; "
                f"params {self.params_before:,} -> {self.params_after:,}")
        if self.check is not None:
            line += f"; {self.check.summary()}"
        if not self.function_preserving:
            line += f" ({self.not_preserving}: NOT function-preserving"
            line += ")" if self.deviation is None else f", outputs differ by max_rel {self.deviation:.3g})"
        return line

    def table(self) -> str:
        rows = [f"{'space':40s} {'old':>6s} {'new':>6s}  status / reason"]
        for s in self.spaces:
            reason = "; ".join(s.frozen_reasons)
            shape = (f" (heads {s.old_width // s.head_dim} -> {s.new_width // s.head_dim} of {s.head_dim})"
                     if s.head_dim > 1 else " (residual stream)" if s.normalized else "")
            rows.append(f"{s.name[:40]:40s} {s.old_width:6d} {s.new_width:6d}  {s.status}{shape}"
                        + (f": {reason}" if reason else ""))
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {
            "spaces": [s.to_dict() for s in self.spaces],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "function_preserving": self.function_preserving,
            "deviation": self.deviation,
            "opaque_leaves": list(self.opaque_leaves),
            "frozen_reasons": self.frozen_reasons(),
            "check": self.check.to_dict() if self.check is not None and hasattr(self.check, "to_dict") else None,
            "rounds": self.rounds,
            "notes": list(self.notes),
        }


def record_growth(result, fn, **kwargs):
    """Attach to a grown model the call that made it (``result.graphgrow_growth``, a ``functools.partial``
    taking the teacher): :func:`graphgrow.optim.growth_map` replays it on probe copies of the teacher to learn
    which teacher entry each grown entry copies.  A growth that retried with other options (heads kept, fill
    kept) records the call that succeeded."""
    import functools

    result.graphgrow_growth = functools.partial(fn, **kwargs)
    return result
