"""Selectors, rules and plan resolution on plain layer records (no framework)."""

from __future__ import annotations

import json

import pytest

from bnkit.errors import SelectorError
from bnkit.policy import (
    MODE_STATES,
    STATS_ONLY,
    AllBN,
    Block,
    BNState,
    Depth,
    FromLayer,
    Glob,
    IndexRange,
    LayerInfo,
    LayerType,
    Mode,
    Plan,
    Policy,
    Regex,
    Rule,
    mode_of,
    parse_rule,
    parse_selector,
    resolve,
)

NAMES = [
    ("conv1_conv", "Conv2D"),
    ("conv1_bn", "BatchNormalization"),
    ("conv2_block1_preact_bn", "BatchNormalization"),
    ("conv2_block1_1_conv", "Conv2D"),
    ("conv2_block1_1_bn", "PinnedBatchNormalization"),
    ("conv5_block1_1_conv", "Conv2D"),
    ("conv5_block1_1_bn", "BatchNormalization"),
    ("head", "Dense"),
]
LAYERS = [
    LayerInfo(f"base/{n}" if n != "head" else n, n, c, i, "BatchNormalization" in c)
    for i, (n, c) in enumerate(NAMES)
]
CURRENT = [(True, "train" if layer.is_bn else None) for layer in LAYERS]


def names(idx: list[int]) -> list[str]:
    return [LAYERS[i].name for i in idx]


def test_selectors_pick_the_documented_layers():
    assert names(AllBN().match(LAYERS)) == [
        "conv1_bn",
        "conv2_block1_preact_bn",
        "conv2_block1_1_bn",
        "conv5_block1_1_bn",
    ]
    assert names(Glob("conv5_*").match(LAYERS)) == ["conv5_block1_1_conv", "conv5_block1_1_bn"]
    assert names(Glob("base/conv1_*").match(LAYERS)) == ["conv1_conv", "conv1_bn"]
    assert names(Regex(r"preact_bn$").match(LAYERS)) == ["conv2_block1_preact_bn"]
    assert names(IndexRange(-2, None).match(LAYERS)) == ["conv5_block1_1_bn", "head"]
    assert names(FromLayer("conv5_block1_1_conv").match(LAYERS)) == [
        "conv5_block1_1_conv",
        "conv5_block1_1_bn",
        "head",
    ]
    assert names(Depth(0.75).match(LAYERS)) == ["conv5_block1_1_bn", "head"]
    assert names(Block("conv2_block1").match(LAYERS)) == [
        "conv2_block1_preact_bn",
        "conv2_block1_1_conv",
        "conv2_block1_1_bn",
    ]
    assert names(LayerType("Dense").match(LAYERS)) == ["head"]
    # BatchNormalization as a type also picks subclasses
    assert len(LayerType("BatchNormalization").match(LAYERS)) == 4


def test_from_unknown_layer_names_the_closest():
    with pytest.raises(SelectorError) as err:
        FromLayer("conv5_block1_1_cnv").match(LAYERS)
    assert "conv5_block1_1_conv" in str(err.value)


def test_parse_selector_round_trips_every_kind():
    for text in [
        "bn",
        "all",
        "glob:conv5_*",
        "re:preact_bn$",
        "index:2:5",
        "index::3",
        "from:head",
        "depth:0.5:0.75",
        "block:conv2_block1",
        "type:Dense",
    ]:
        assert str(parse_selector(text)) == text
    assert str(parse_selector("conv1_bn")) == "glob:conv1_bn"
    with pytest.raises(SelectorError, match="expected"):
        parse_selector("index:a:b")


def test_parse_rule_maps_modes_to_trainability():
    rule = parse_rule("glob:conv5_*=affine")
    assert (rule.trainable, rule.bn) == (True, Mode.AFFINE)
    assert parse_rule("bn=frozen").trainable is False
    with pytest.raises(SelectorError, match="frozen, affine, train, adapt"):
        parse_rule("bn=freeze")
    with pytest.raises(SelectorError, match="SELECTOR=MODE"):
        parse_rule("bn")


def test_later_rules_win_and_bn_mode_sets_bn_trainability():
    policy = Policy.build(
        train_from="conv2_block1_1_conv",
        bn="affine",
        rules=[parse_rule("re:preact_bn$=frozen"), Rule(Glob("head"), trainable=False)],
    )
    plan = {d.path.split("/")[-1]: d for d in resolve(LAYERS, CURRENT, policy)}
    assert plan["conv1_conv"].trainable is False
    assert plan["conv1_bn"].bn_mode == "frozen"
    assert plan["conv2_block1_preact_bn"].bn_mode == "frozen"
    assert plan["conv2_block1_1_conv"].trainable is True
    assert (plan["conv2_block1_1_bn"].bn_mode, plan["conv2_block1_1_bn"].trainable) == (
        "affine",
        True,
    )
    assert plan["conv5_block1_1_bn"].bn_mode == "affine"
    assert plan["head"].trainable is False and plan["head"].rule == 3


def test_untouched_layers_keep_their_state():
    decisions = resolve(LAYERS, CURRENT, Policy((Rule(Glob("conv1_bn"), bn=Mode.FROZEN),)))
    untouched = [d for d in decisions if d.rule is None]
    assert len(untouched) == len(LAYERS) - 1
    assert all(d.trainable and (d.bn_mode in (None, "train")) for d in untouched)


def test_rule_that_selects_nothing_or_no_bn_is_an_error():
    with pytest.raises(SelectorError, match="matches no layer"):
        resolve(LAYERS, CURRENT, Policy((Rule(Glob("conv9_*"), trainable=False),)))
    with pytest.raises(SelectorError, match="selects no BN layer"):
        resolve(LAYERS, CURRENT, Policy((Rule(Glob("head"), bn=Mode.FROZEN),)))
    no_bn = [layer for layer in LAYERS if not layer.is_bn]
    with pytest.raises(SelectorError, match="no BatchNormalization layer"):
        resolve(no_bn, [(True, None)] * len(no_bn), Policy.build(bn="frozen"))
    with pytest.raises(SelectorError, match="sets nothing"):
        Rule(AllBN())


def test_mode_states_are_the_design_table():
    assert mode_of(MODE_STATES[Mode.FROZEN]) == "frozen"
    assert mode_of(MODE_STATES[Mode.AFFINE]) == "affine"
    assert mode_of(MODE_STATES[Mode.TRAIN]) == "train"
    assert mode_of(BNState(False, True, True)) == STATS_ONLY
    assert MODE_STATES[Mode.ADAPT] == MODE_STATES[Mode.FROZEN]


def test_plan_serialises():
    decisions = resolve(LAYERS, CURRENT, Policy.build(bn="frozen"))
    plan = Plan(decisions, "bn -> bn=frozen")
    doc = json.loads(plan.to_json())
    assert doc["bn_modes"] == {"frozen": 4}
    assert len(doc["layers"]) == len(LAYERS)
    assert "frozen 4" in str(plan)
