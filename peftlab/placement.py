"""Placement: the user's spec (named placement, layer selection, explicit targets) -> concrete targets."""

from __future__ import annotations

from dataclasses import dataclass

from .modelmap import LinearSite, Runs


@dataclass(frozen=True)
class Target:
    """One module to adapt; for a fused projection, optionally only some of its slices."""

    site: LinearSite
    slices: tuple[str, ...] | None = None  # fused sites only, e.g. ("q", "v"); None = the whole output

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def layer(self) -> int | None:
        return self.site.layer

    @property
    def role(self) -> str:
        return self.site.role

    def out_runs(self) -> Runs:
        """Output rows the update touches, as (start, length) runs."""
        if self.slices is None:
            return ((0, self.site.out_features),)
        return tuple(run for name in self.slices for run in self.site.slices[name])

    def adapted_out_features(self) -> int:
        return sum(length for _, length in self.out_runs())
