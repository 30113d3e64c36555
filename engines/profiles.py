"""TensorRT optimization profiles derived from a :class:`GraphSpec`, and nothing else.

A profile is plain data, ``{input name: (min shape, opt shape, max shape)}``; sum dims such
as the mask's ``past+new`` axis follow from the dim sizes. A graph can get several
profiles by splitting one dim's range: e.g. ``new`` in ``[1, 64]`` for decode and tree
verification and ``[65, max_len]`` for prefill, so each is tuned for its own ``opt``.
"""
from __future__ import annotations

from typing import Sequence

from polygraphy.backend.trt import Profile

from vispec.runtime.specs import NEW, Dim, GraphSpec

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]
DEFAULT_SPLITS = (("decode", 64), ("prefill", None))


def profile_shapes(spec: GraphSpec, dims: Sequence[Dim] = ()) -> ProfileShapes:
    """(min, opt, max) shape of every input of ``spec``; ``dims`` replace the spec's dims
    of the same name (a narrowed range)."""
    ranges = {d.name: d for d in spec.dims} | {d.name: d for d in dims}
    by_level = [{name: getattr(d, level) for name, d in ranges.items()}
                for level in ("min", "opt", "max")]
    return {t.name: tuple(spec.shape(t.name, sizes) for sizes in by_level)
            for t in spec.inputs}


def split_dim(dim: Dim, splits: Sequence[tuple[str, int | None]]) -> dict[str, Dim]:
    """Cut ``dim``'s range into consecutive named ranges.

    Each split is ``(name, inclusive upper bound)``; the last bound must be ``None`` (up to
    ``dim.max``) so the ranges cover the whole spec. Ranges left empty (the dim ends
    below them) are dropped. Each range's ``opt`` is the dim's ``opt`` clamped into it.
    """
    if not splits or splits[-1][1] is not None:
        raise ValueError(f"splits of dim {dim.name!r}: {list(splits)}. Expected the last "
                         f"bound to be None (up to the dim's max {dim.max})")
    ranges, lo = {}, dim.min
    for name, upper in splits:
        hi = dim.max if upper is None else min(upper, dim.max)
        if upper is not None and upper < lo:
            raise ValueError(f"splits of dim {dim.name!r}: bound {upper} of {name!r} is "
                             f"below the range start {lo}. Expected increasing bounds")
        if lo > dim.max:
            break
        ranges[name] = Dim(dim.name, lo, min(max(dim.opt, lo), hi), hi)
        lo = hi + 1
    return ranges


def graph_profiles(spec: GraphSpec,
                   splits: Sequence[tuple[str, int | None]] = DEFAULT_SPLITS,
                   dim: str = NEW) -> dict[str, ProfileShapes]:
    """Named profiles of ``spec``: one per range of ``dim`` (one ``"all"`` profile when the
    graph has no such dim or ``splits`` is empty)."""
    if not splits or dim not in {d.name for d in spec.dims}:
        return {"all": profile_shapes(spec)}
    return {name: profile_shapes(spec, [d])
            for name, d in split_dim(spec.dim(dim), splits).items()}


def to_polygraphy(profiles: dict[str, ProfileShapes]) -> list[Profile]:
    """``polygraphy.backend.trt.Profile`` objects, in the order of ``profiles``."""
    out = []
    for shapes in profiles.values():
        profile = Profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.add(name, min=lo, opt=opt, max=hi)
        out.append(profile)
    return out
