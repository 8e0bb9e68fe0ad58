"""Exit layer counts: an exit is a 1-based layer count; these check, sort and pair them
(with the last layer always included) for the config and every caller that takes exits."""

from __future__ import annotations

import operator

def layer_count(value, num_layers: int, name: str = "exit", *, not_last: str | None = None,
                error: type[Exception] = ValueError) -> int:
    """`value` as an int in 1..num_layers (1..num_layers-1 when `not_last` gives the reason
    the last layer is excluded), else `error` naming `name` and the expected range."""
    try:
        v = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        v = None
    hi = num_layers - 1 if not_last else num_layers
    if v is None or not 1 <= v <= hi:
        why = f"; {not_last}" if not_last and v == num_layers else ""
        raise error(f"{name} {value!r} is not a layer count of this {num_layers}-layer model "
                    f"(expected 1..{hi}{why})")
    return v


def normalize_exits(exits, num_layers: int) -> tuple[int, ...]:
    """Validate 1-based exit layer counts, sort them and make sure the last layer is included."""
    if exits is None:
        return (num_layers,)
    if isinstance(exits, int):
        exits = (exits,)
    return tuple(sorted({layer_count(e, num_layers) for e in exits} | {num_layers}))


def pair_exit_weights(exits, weights, num_layers: int, exits_name: str = "exits",
                      weights_name: str = "exit_weights"
                      ) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
    """(sorted exits with the last layer, their weights): weight i belongs to exit i as
    written; when the last layer is not written, a trailing extra weight may give its own
    (else the lengths must match exactly)."""
    if weights is None:
        return normalize_exits(exits, num_layers), None
    written = [num_layers] if exits is None else [exits] if isinstance(exits, int) else list(
        exits)
    resolved = normalize_exits(written, num_layers)
    if len(set(int(e) for e in written)) != len(written):
        raise ValueError(f"{exits_name}={tuple(written)} repeats an exit, so {weights_name} "
                         "cannot be paired with it")
    if num_layers not in written and len(weights) == len(written) + 1:
        written.append(num_layers)
    if len(weights) != len(written):
        raise ValueError(
            f"{weights_name} has {len(weights)} entries but {exits_name}={tuple(written)} has "
            f"{len(written)} (one weight per exit as written; the last layer {num_layers} is "
            f"added to the exits unless listed, and then needs its own weight)")
    pairs = dict(zip((int(e) for e in written), (float(w) for w in weights)))
    if set(pairs) != set(resolved):
        raise ValueError(f"{weights_name} gives no weight for the last layer {num_layers}: add "
                         f"it to {exits_name} with a weight")
    return resolved, tuple(pairs[e] for e in resolved)
