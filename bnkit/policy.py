"""BN modes, layer selectors, freeze rules and the per-layer plan.

Framework-neutral: works on `LayerInfo` records that a backend produces.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field

from bnkit.errors import SelectorError, closest


class Mode(str, enum.Enum):
    """What a BatchNorm layer does during training.

    `frozen`: normalise with the running statistics, which stay fixed, and keep
    gamma/beta fixed. `affine`: running statistics fixed and used, gamma/beta
    trained. `train`: normalise with batch statistics, update the running
    statistics, train gamma/beta. `adapt`: as `frozen`, after the running
    statistics are re-estimated on target data.
    """

    FROZEN = "frozen"
    AFFINE = "affine"
    TRAIN = "train"
    ADAPT = "adapt"

    def __str__(self) -> str:
        return self.value


STATS_ONLY = "stats-only"
"""Effective state that is none of the four modes: batch statistics used and
running statistics updated, but gamma/beta fixed (Keras: a trainable BN inside
a non-trainable parent; PyTorch: `requires_grad=False` in `train()` mode)."""


@dataclass(frozen=True)
class BNState:
    """The three independent facts that make up a BN layer's behaviour in training."""

    affine_trained: bool
    """gamma and beta receive gradient updates."""
    stats_update: bool
    """the running mean and variance change."""
    batch_stats: bool
    """the layer normalises with the statistics of the current batch."""


MODE_STATES: dict[Mode, BNState] = {
    Mode.FROZEN: BNState(affine_trained=False, stats_update=False, batch_stats=False),
    Mode.AFFINE: BNState(affine_trained=True, stats_update=False, batch_stats=False),
    Mode.TRAIN: BNState(affine_trained=True, stats_update=True, batch_stats=True),
    Mode.ADAPT: BNState(affine_trained=False, stats_update=False, batch_stats=False),
}


def mode_of(state: BNState) -> str:
    """Names a BN state: one of the modes (`adapt` reads as `frozen`), or `stats-only`/`custom`.

    Examples:
        >>> mode_of(BNState(affine_trained=True, stats_update=False, batch_stats=False))
        'affine'
    """
    for mode in (Mode.FROZEN, Mode.AFFINE, Mode.TRAIN):
        if MODE_STATES[mode] == state:
            return mode.value
    if state.stats_update and state.batch_stats:
        return STATS_ONLY
    return "custom"


@dataclass(frozen=True)
class LayerInfo:
    """One leaf layer as the selectors see it."""

    path: str
    name: str
    class_name: str
    index: int
    is_bn: bool


# --------------------------------------------------------------------------- selectors


class Selector:
    """Chooses layers from the flattened, topologically ordered list of leaf layers."""

    def match(self, layers: Sequence[LayerInfo]) -> list[int]:
        """Returns the positions in `layers` this selector picks, in order."""
        raise NotImplementedError

    def __str__(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class AllLayers(Selector):
    """Every layer."""

    def match(self, layers: Sequence[LayerInfo]) -> list[int]:
        return list(range(len(layers)))

    def __str__(self) -> str:
        return "all"


@dataclass(frozen=True)
class AllBN(Selector):
    """Every BatchNormalization layer, subclasses and synchronized BN included."""

    def match(self, layers: Sequence[LayerInfo]) -> list[int]:
        return [i for i, layer in enumerate(layers) if layer.is_bn]

    def __str__(self) -> str:
        return "bn"


@dataclass(frozen=True)
class LayerType(Selector):
    """Layers of class `class_name` (`BatchNormalization` also matches BN subclasses)."""

    class_name: str

    def match(self, layers: Sequence[LayerInfo]) -> list[int]:
        want = self.class_name
        return [
            i
            for i, layer in enumerate(layers)
            if layer.class_name == want or (want == "BatchNormalization" and layer.is_bn)
        ]

    def __str__(self) -> str:
        return f"type:{self.class_name}"


@dataclass(frozen=True)
class Glob(Selector):
    """Layers whose name or path matches a shell-style pattern (`conv5_*`, `base/*_bn`)."""

    pattern: str

    def match(self, layers: Sequence[LayerInfo]) -> list[int]:
        p = self.pattern
        return [
            i
            for i, layer in enumerate(layers)
            if fnmatch.fnmatchcase(layer.name, p) or fnmatch.fnmatchcase(layer.path, p)
        ]

    def __str__(self) -> str:
        return f"glob:{self.pattern}"


@dataclass(frozen=True)
class Regex(Selector):
    """Layers whose path contains a match of a regular expression (`re.search`)."""

    pattern: str

    def __post_init__(self) -> None:
        self._compiled()  # refused when made, before any framework starts

    def _compiled(self) -> re.Pattern[str]:
        try:
            return re.compile(self.pattern)
        except (re.error, TypeError) as err:
            raise SelectorError(f"invalid regular expression {self.pattern!r}: {err}") from None

    def match(self, layers: Sequence[LayerInfo]) -> list[int]:
        rx = self._compiled()
        return [i for i, layer in enumerate(layers) if rx.search(layer.path)]

    def __str__(self) -> str:
        return f"re:{self.pattern}"


@dataclass(frozen=True)
class IndexRange(Selector):
    """Layers at positions `start` (inclusive) to `stop` (exclusive), Python slice rules."""

    start: int | None = None
    stop: int | None = None

    def match(self, layers: Sequence[LayerInfo]) -> list[int]:
        return list(range(len(layers)))[self.start : self.stop]

    def __str__(self) -> str:
        a = "" if self.start is None else str(self.start)
        b = "" if self.stop is None else str(self.stop)
        return f"index:{a}:{b}"


@dataclass(frozen=True)
class FromLayer(Selector):
    """The named layer and every layer after it in topological order."""

    name: str

    def match(self, layers: Sequence[LayerInfo]) -> list[int]:
        start = find_layer(layers, self.name)
        return list(range(start, len(layers)))

    def __str__(self) -> str:
        return f"from:{self.name}"


@dataclass(frozen=True)
class Depth(Selector):
    """Layers whose relative depth (position / count) lies in [start, stop)."""

    start: float
    stop: float = 1.0

    def match(self, layers: Sequence[LayerInfo]) -> list[int]:
        if not 0.0 <= self.start <= 1.0 or not 0.0 <= self.stop <= 1.0:
            raise SelectorError(
                f"depth fractions must lie in [0, 1], got {self.start}..{self.stop}"
            )
        n = len(layers)
        hi = n if self.stop >= 1.0 else round(self.stop * n)
        return list(range(round(self.start * n), hi))

    def __str__(self) -> str:
        return f"depth:{self.start:g}:{self.stop:g}"


@dataclass(frozen=True)
class Block(Selector):
    """Layers named `prefix` or `prefix_...` (`conv5_block1` picks that residual block)."""

    prefix: str

    def match(self, layers: Sequence[LayerInfo]) -> list[int]:
        p = self.prefix
        return [
            i
            for i, layer in enumerate(layers)
            if any(s == p or s.startswith(p + "_") for s in (layer.name, layer.path))
        ]

    def __str__(self) -> str:
        return f"block:{self.prefix}"


def find_layer(layers: Sequence[LayerInfo], name: str) -> int:
    """Position of the layer with path or name `name` (for a container, its first layer);
    raises SelectorError naming the closest."""
    for i, layer in enumerate(layers):
        if layer.path == name:
            return i
    inside = [
        i for i, layer in enumerate(layers) if layer.path.startswith((f"{name}/", f"{name}."))
    ]
    if inside:  # a container's path (a nested model, a PyTorch Sequential): its first layer
        return inside[0]
    hits = [i for i, layer in enumerate(layers) if layer.name == name]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        paths = ", ".join(layers[i].path for i in hits)
        raise SelectorError(f"layer name {name!r} is ambiguous ({paths}): give the full path")
    hint = closest(name, [layer.name for layer in layers])
    raise SelectorError(f"no layer named {name!r}" + (f" ({hint})" if hint else ""))


def find_layer_name(name: str, names: Collection[str]) -> None:
    """Raises SelectorError unless `name` (or the last part of a path) is in `names`."""
    if name in names or name.rsplit("/", 1)[-1] in names:
        return
    hint = closest(name, names)
    raise SelectorError(f"no layer named {name!r}" + (f" ({hint})" if hint else ""))


_SELECTOR_HELP = (
    "bn, all, type:CLASS, glob:PATTERN, re:REGEX, index:A:B, from:NAME, "
    "depth:A[:B], block:PREFIX, or a layer name"
)


def parse_selector(text: str) -> Selector:
    """Parses the CLI form of a selector.

    Examples:
        >>> str(parse_selector("glob:conv5_*"))
        'glob:conv5_*'
    """
    kind, sep, arg = text.partition(":")
    if not sep:
        if text == "bn":
            return AllBN()
        if text == "all":
            return AllLayers()
        return Glob(text)
    try:
        return _parse_with_arg(kind, arg)
    except ValueError:
        raise SelectorError(f"cannot read selector {text!r}: expected {_SELECTOR_HELP}") from None


def as_selector(value: Selector | str) -> Selector:
    """A Selector, or the one its command-line form names (`bn`, `re:...`, `glob:...`).

    Examples:
        >>> str(as_selector("re:_bn$"))
        're:_bn$'
    """
    if isinstance(value, Selector):
        return value
    if isinstance(value, str):
        return parse_selector(value)
    raise SelectorError(
        f"a selector is a bnkit Selector or its text form ({_SELECTOR_HELP}), got "
        f"{value!r} ({type(value).__name__})"
    )


def _parse_with_arg(kind: str, arg: str) -> Selector:
    if kind == "type":
        return LayerType(arg)
    if kind == "glob":
        return Glob(arg)
    if kind == "re":
        return Regex(arg)
    if kind == "from":
        return FromLayer(arg)
    if kind == "block":
        return Block(arg)
    if kind == "index":
        a, _, b = arg.partition(":")
        return IndexRange(int(a) if a else None, int(b) if b else None)
    if kind == "depth":
        a, _, b = arg.partition(":")
        return Depth(float(a), float(b) if b else 1.0)
    raise ValueError(kind)


# --------------------------------------------------------------------------- rules, policy


@dataclass(frozen=True)
class Rule:
    """Says what to do with the layers a selector picks.

    `trainable` sets non-BN layers trainable or not; for BN layers it means
    mode `train` or `frozen` unless `bn` names a mode, which wins for BN.
    """

    select: Selector
    trainable: bool | None = None
    bn: Mode | None = None

    def __post_init__(self) -> None:
        if self.trainable is None and self.bn is None:
            raise SelectorError(f"rule {self.select} sets nothing: give trainable= or bn=")
        if self.bn is not None:
            object.__setattr__(self, "bn", parse_mode(self.bn))

    def __str__(self) -> str:
        parts = []
        if self.trainable is not None:
            parts.append("trainable" if self.trainable else "fixed")
        if self.bn is not None:
            parts.append(f"bn={self.bn}")
        return f"{self.select} -> {', '.join(parts)}"


def parse_mode(value: str | Mode) -> Mode:
    """Returns the Mode named by `value`; raises SelectorError listing the valid ones."""
    try:
        return Mode(value)
    except ValueError:
        valid = ", ".join(m.value for m in Mode)
        raise SelectorError(f"unknown BN mode {value!r}: choose one of {valid}") from None


_CLI_MODE_TRAINABLE = {Mode.FROZEN: False, Mode.ADAPT: False, Mode.AFFINE: True, Mode.TRAIN: True}


def parse_rule(text: str) -> Rule:
    """Parses `SELECTOR=MODE`; non-BN layers become trainable for `affine`/`train`.

    Examples:
        >>> str(parse_rule("re:preact_bn$=frozen"))
        're:preact_bn$ -> fixed, bn=frozen'
    """
    sel, sep, mode_text = text.rpartition("=")
    if not sep or not sel:
        raise SelectorError(f"cannot read rule {text!r}: expected SELECTOR=MODE, e.g. bn=frozen")
    mode = parse_mode(mode_text)
    return Rule(parse_selector(sel), trainable=_CLI_MODE_TRAINABLE[mode], bn=mode)


@dataclass(frozen=True)
class Policy:
    """An ordered list of rules; later rules win."""

    rules: tuple[Rule, ...]

    @classmethod
    def build(
        cls,
        *,
        train_from: str | None = None,
        bn: str | Mode | None = None,
        rules: Sequence[Rule] = (),
    ) -> Policy:
        """The usual fine-tune policy, then `rules`.

        With `train_from`, every layer before it is frozen (BN `frozen`) and
        it and every later layer is trainable, BN layers among them in mode `bn`
        (`train` when not given). Without it, `bn` applies to every BN layer.
        """
        base: list[Rule] = []
        mode = None if bn is None else parse_mode(bn)
        if train_from is not None:
            base.append(Rule(AllLayers(), trainable=False))
            base.append(Rule(FromLayer(train_from), trainable=True, bn=mode))
        elif mode is not None:
            base.append(Rule(AllBN(), bn=mode))
        return cls(tuple(base) + tuple(rules))

    def __str__(self) -> str:
        return "; ".join(str(r) for r in self.rules) or "(no rules)"


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class LayerDecision:
    """What the plan says for one leaf layer."""

    path: str
    class_name: str
    is_bn: bool
    trainable: bool
    bn_mode: str | None
    rule: int | None
    """position of the rule that decided it; None when no rule touched it."""


@dataclass(frozen=True)
class Plan:
    """The per-layer result of a policy: what `freeze` applied and `watch` verifies."""

    layers: tuple[LayerDecision, ...]
    policy: str
    needs_recompile: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def by_path(self) -> dict[str, LayerDecision]:
        """The decisions keyed by layer path."""
        return {d.path: d for d in self.layers}

    def bn_counts(self) -> dict[str, int]:
        """Number of BN layers per mode."""
        counts: dict[str, int] = {}
        for d in self.layers:
            if d.is_bn and d.bn_mode is not None:
                counts[d.bn_mode] = counts.get(d.bn_mode, 0) + 1
        return counts

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """A plan written by `to_json` (the `.plan.json` of `bnkit freeze` on a PyTorch
        model), to apply again with `bnkit.freeze(model, plan)`.

        Examples:
            >>> p = Plan((LayerDecision("fc", "Linear", False, True, None, 0),), "all")
            >>> Plan.from_json(p.to_json()) == p
            True
        """
        try:
            doc = json.loads(text)
            layers = tuple(LayerDecision(**d) for d in doc["layers"])
            return cls(
                layers,
                str(doc["policy"]),
                bool(doc.get("needs_recompile", False)),
                tuple(doc.get("notes", ())),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise SelectorError(
                f"not a bnkit plan ({err}): give a file bnkit freeze wrote"
            ) from None

    def to_json(self) -> str:
        """The plan as a JSON document."""
        return json.dumps(
            {
                "policy": self.policy,
                "needs_recompile": self.needs_recompile,
                "notes": list(self.notes),
                "bn_modes": self.bn_counts(),
                "trainable_layers": sum(d.trainable for d in self.layers),
                "layers": [asdict(d) for d in self.layers],
            },
            indent=2,
        )

    def __str__(self) -> str:
        trainable = sum(d.trainable for d in self.layers)
        modes = ", ".join(f"{k} {v}" for k, v in sorted(self.bn_counts().items())) or "none"
        lines = [
            f"plan: {self.policy}",
            f"  {trainable} of {len(self.layers)} layers trainable; BN modes: {modes}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def resolve(
    layers: Sequence[LayerInfo],
    current: Sequence[tuple[bool, str | None]],
    policy: Policy,
) -> tuple[LayerDecision, ...]:
    """Applies `policy` to `layers`, starting from `current` (trainable, BN mode) per layer.

    Raises SelectorError when a rule selects nothing, or sets only a BN mode
    and selects no BN layer.
    """
    state: list[_Entry] = [_Entry(t, m, None) for t, m in current]
    for k, rule in enumerate(policy.rules):
        picked = rule.select.match(layers)
        if not picked:
            raise SelectorError(no_match_message(rule.select, layers))
        if rule.trainable is None and not any(layers[i].is_bn for i in picked):
            raise SelectorError(f"rule {rule} sets a BN mode but selects no BN layer")
        for i in picked:
            _apply_rule(state[i], layers[i].is_bn, rule, k)
    return tuple(
        LayerDecision(info.path, info.class_name, info.is_bn, s.trainable, s.bn_mode, s.rule)
        for info, s in zip(layers, state, strict=True)
    )


@dataclass
class _Entry:
    trainable: bool
    bn_mode: str | None
    rule: int | None


def _apply_rule(entry: _Entry, is_bn: bool, rule: Rule, k: int) -> None:
    if is_bn:
        mode = rule.bn
        if mode is None:
            mode = Mode.TRAIN if rule.trainable else Mode.FROZEN
        entry.trainable = MODE_STATES[mode].affine_trained
        entry.bn_mode = mode.value
        entry.rule = k
        return
    if rule.trainable is not None:
        entry.trainable = rule.trainable
        entry.rule = k


def no_match_message(select: Selector, layers: Sequence[LayerInfo]) -> str:
    """Says that `select` matched nothing, naming the closest layer names or classes."""
    if isinstance(select, AllBN):
        return (
            "the model has no BatchNormalization layer (subclasses and synchronized BN "
            "count too); there is nothing to freeze or adapt"
        )
    pattern = getattr(select, "pattern", None) or getattr(select, "prefix", None)
    pattern = pattern or getattr(select, "class_name", None)
    hint = ""
    if pattern:
        names = [layer.name for layer in layers]
        if isinstance(select, LayerType):
            names = sorted({layer.class_name for layer in layers})
        hint = closest(pattern.strip("*?^$"), names)
    return f"selector {select} matches no layer" + (f" ({hint})" if hint else "")
