"""Layer selection, shared by the models, the backends and attention capture (the one copy)."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import LayerIndexError


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """None -> all layers; negative indices count from the end; duplicates removed, order kept."""
    if layers is None:
        return list(range(num_layers))
    out: list[int] = []
    for l in layers:
        k = l + num_layers if l < 0 else l
        if not 0 <= k < num_layers:
            raise LayerIndexError(
                f"layer {l} is out of range for a model with {num_layers} layers; "
                f"use 0..{num_layers - 1}, or -1..-{num_layers} from the end"
            )
        if k not in out:
            out.append(k)
    return out


def parse_layers(spec: str | None) -> list[int] | None:
    """``--layers``: "all" (or nothing) -> None; "0,5,-1" -> [0, 5, -1]; anything else: LayerIndexError."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    try:
        return [int(t) for t in spec.split(",") if t.strip()]
    except ValueError as e:
        raise LayerIndexError(f"--layers takes comma-separated integers like 0,5,-1, not {spec!r}") from e
