"""The model zoo sweep: every torchvision classification model, timm models across
families, every `keras.applications` model and KerasHub's image classifiers (one per
backbone family with BN), built with random weights, each put through what bnkit
promises:

- `inspect` finds as many BN layers as a count made here (isinstance of the framework's
  BatchNorm classes, FrozenBatchNorm included, nested models recursed);
- `frozen` keeps every BN statistic and gamma/beta bit-identical through 2 real training
  steps (SGD, `model.train()` / `fit`), `affine` keeps the statistics and moves gamma/beta;
- `adapt` gives finite statistics;
- `check` runs, and finds no BN021 ("statistics never saw data") once `adapt` estimated
  the statistics: the "BN021" column counts those false positives;
- `export` folds, verifies (export vs original, one sample vs a batch, training vs
  inference) and reloads the written file (`.pt2` for PyTorch, `.keras` for Keras).

A model that fails any of these is a row with what failed; bnkit refusing in one line
(a BnkitError) is a row with the reason. Usage:

    .venv/bin/python benchmarks/zoo.py torchvision            # every torchvision model
    .venv/bin/python benchmarks/zoo.py timm
    KERAS_BACKEND=torch .venv/bin/python benchmarks/zoo.py keras
    KERAS_BACKEND=jax .venv/bin/python benchmarks/zoo.py kerashub   # any Keras backend
    .venv/bin/python benchmarks/zoo.py torchvision --models resnet18,googlenet --json out.json

It prints a Markdown table (the one in benchmarks/README.md) and exits 1 when a row failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

TIMM_MODELS = (
    "resnet18", "resnet50d", "efficientnet_b0", "tf_efficientnet_b0", "efficientnetv2_rw_t",
    "mobilenetv3_small_100", "mobilenetv3_large_100", "mobilenetv4_conv_small", "regnetx_002",
    "regnety_002", "densenet121", "dla34", "dpn68", "cspresnet50", "cspdarknet53",
    "res2net50_26w_4s", "resnest14d", "selecsls42b", "hrnet_w18_small", "vovnet39a",
    "ese_vovnet19b_dw", "mixnet_s", "repvgg_a0", "mobileone_s0", "fastvit_t8", "levit_128s",
    "inception_v3", "xception41", "ghostnet_100", "rexnet_100", "convnext_atto", "seresnet18",
    "ecaresnet26t", "tinynet_a", "lcnet_050", "hardcorenas_a",
)  # fmt: skip
"""At least one of each family the field reaches for (levit uses BatchNorm1d, convnext has
no BN)."""
SIZE = 64
"""Input side for the sweep; models with a fixed input size get theirs."""
BATCH = 4
FIXED_SIZE = {"inception_v3": 299, "vit": 224, "swin": 224, "maxvit": 224, "levit": 224,
              "fastvit": 64}  # fmt: skip


def _size(name: str, default: int = SIZE) -> int:
    for key, size in FIXED_SIZE.items():
        if name.startswith(key):
            return size
    return default


def _row(name: str, build: Any, checks: Any) -> dict[str, Any]:
    import bnkit

    t0 = time.perf_counter()
    row: dict[str, Any] = {"model": name}
    try:
        row.update(checks(build()))
        row["status"] = "ok" if not row.get("failed") else "FAILED: " + "; ".join(row["failed"])
    except bnkit.BnkitError as err:
        row["status"] = f"refused: {str(err).splitlines()[0][:160]}"
    except Exception as err:  # a failure the sweep is here to find
        row["status"] = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        row["traceback"] = traceback.format_exc(limit=6)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# ---------------------------------------------------------------------- PyTorch


def _torch_bn_count(model: Any) -> int:
    from torch import nn

    frozen = ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")
    return sum(
        isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ in frozen
        for m in model.modules()
    )


def _torch_bn_values(model: Any) -> dict[str, dict[str, np.ndarray]]:
    from torch import nn

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            values = {"mean": m.running_mean, "var": m.running_var}
            if m.weight is not None:
                values.update(gamma=m.weight, beta=m.bias)
            out[name] = {k: v.detach().float().numpy().copy() for k, v in values.items()}
    return out


def _logits(out: Any) -> Any:
    if isinstance(out, tuple):  # googlenet/inception in training: (logits, aux...)
        return out[0]
    return getattr(out, "logits", out)


def _torch_steps(model: Any, x: Any, steps: int = 2) -> None:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05) if params else None
    model.train()
    for _ in range(steps):
        out = _logits(model(x))
        loss = out.float().pow(2).mean()
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()


def _torch_checks(model: Any, size: int) -> dict[str, Any]:
    import torch

    import bnkit

    torch.manual_seed(0)
    row: dict[str, Any] = {"failed": []}
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    own = _torch_bn_count(model)
    found = len(bnkit.inspect(model).bn_layers)
    row["bn"] = own
    if found != own:
        row["failed"].append(f"inspect found {found} BN, counted {own}")
    x = torch.randn(BATCH, 3, size, size)
    if own:
        row["hold"] = _torch_hold(model, x, row["failed"])
        adapted = copy.deepcopy(model)
        bnkit.adapt(adapted, x.numpy())
        bad = [
            p
            for p, v in _torch_bn_values(adapted).items()
            if not all(np.isfinite(a).all() for a in v.values())
        ]
        if bad:
            row["failed"].append(f"adapt left non-finite statistics in {bad[0]}")
    report = bnkit.check(model, batch_size=32, input_shape=(3, size, size))
    row["check"] = f"{len(report.errors)} errors, {len(report.findings)} findings"
    row["bn021"] = _unestimated(bnkit.check(adapted, input_shape=(3, size, size))) if own else 0
    _export(row, model, adapted if own else None, "m.pt2", input_shape=(3, size, size))
    return row


def _unestimated(report: Any) -> int:
    """BN021 findings on a model whose statistics were estimated: each is a false
    positive. (As built, a model's statistics never saw data: BN021 is right there when
    gamma/beta differ by channel, as timm's RepVGG initialises them.)"""
    return sum(f.code == "BN021" for f in report.findings)


def _export(row: dict[str, Any], model: Any, adapted: Any, name: str, **kw: Any) -> None:
    """Exports the model as built; when its checks fail, the model with statistics
    adapted to the inputs (a deep network with random weights and the default statistics
    0/1 can be numerically chaotic: one sample alone and in a batch differ), and says so."""
    import bnkit

    try:
        with tempfile.TemporaryDirectory() as tmp:
            ex = bnkit.export(model, Path(tmp) / name, **kw)
    except bnkit.ExportError as err:
        if adapted is None:
            raise
        with tempfile.TemporaryDirectory() as tmp:
            ex = bnkit.export(adapted, Path(tmp) / name, **kw)
        row["note"] = f"as built: {str(err).split(':', 1)[0]}; exported after adapt"
    row["fold"] = f"{ex.folded}/{ex.folded + ex.kept}"
    row["export"] = f"{ex.max_diff_original:.1e}" + (" (after adapt)" if "note" in row else "")


def _torch_hold(model: Any, x: Any, failed: list[str]) -> str:
    import bnkit

    results = []
    for mode in ("frozen", "affine"):
        m = copy.deepcopy(model)
        bnkit.freeze(m, bn=mode)
        before = _torch_bn_values(m)
        _torch_steps(m, x)
        after = _torch_bn_values(m)
        stats_moved = [p for p in before if not _same(before[p], after[p], ("mean", "var"))]
        affine_moved = [p for p in before if not _same(before[p], after[p], ("gamma", "beta"))]
        if stats_moved:
            failed.append(f"{mode}: statistics of {stats_moved[0]} moved")
        if mode == "frozen" and affine_moved:
            failed.append(f"frozen: gamma/beta of {affine_moved[0]} moved")
        if mode == "affine" and not affine_moved and any("gamma" in v for v in before.values()):
            failed.append("affine: no gamma/beta moved")
        results.append(f"{mode} ok" if not stats_moved else f"{mode} MOVED")
    return ", ".join(results)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys: tuple[str, ...]) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in keys if k in a)


def sweep_torch(source: str, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        if source == "torchvision":
            import torchvision

            def build(name: str = name) -> Any:
                return torchvision.models.get_model(name, weights=None)
        else:
            import timm

            def build(name: str = name) -> Any:
                return timm.create_model(name, pretrained=False)

        size = _size(name)
        rows.append(_row(name, build, lambda m, size=size: _torch_checks(m, size)))
        print(_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------- Keras


def keras_models() -> list[str]:
    import keras

    return sorted(
        n
        for n in dir(keras.applications)
        if n[0].isupper() and callable(getattr(keras.applications, n))
    )


KERAS_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}


def _keras_bn_values(model: Any) -> dict[str, dict[str, np.ndarray]]:
    import keras

    out = {}
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            out[layer.path] = {
                v.name: np.array(keras.ops.convert_to_numpy(v), copy=True) for v in layer.weights
            }
    return out


def _keras_checks(name: str) -> Any:
    import keras

    size = KERAS_SIZE.get(name, 32)

    def build() -> Any:
        keras.utils.set_random_seed(0)
        base = getattr(keras.applications, name)(
            weights=None, include_top=False, input_shape=(size, size, 3)
        )
        x = keras.layers.GlobalAveragePooling2D()(base.output)
        return keras.Model(base.input, keras.layers.Dense(3)(x), name=f"{name}_head")

    return build, _keras_model_checks(build, size)


def _keras_model_checks(build: Any, size: int) -> Any:
    """The checks of one Keras model that `build()` makes anew for each of them."""
    import keras

    import bnkit

    def checks(model: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"failed": []}
        row["params_m"] = round(model.count_params() / 1e6, 1)
        own = sum(
            isinstance(lyr, keras.layers.BatchNormalization) for lyr in model._flatten_layers()
        )
        found = len(bnkit.inspect(model).bn_layers)
        row["bn"] = own
        if found != own:
            row["failed"].append(f"inspect found {found} BN, counted {own}")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(BATCH * 2, size, size, 3)).astype("float32")
        y = rng.integers(0, 3, BATCH * 2)
        if own:
            holds = []
            for mode in ("frozen", "affine"):
                m = build()
                bnkit.freeze(m, bn=mode)
                m.compile(keras.optimizers.SGD(0.05), "mse", metrics=[])  # KerasHub: no "auto"
                before = _keras_bn_values(m)
                m.fit(x, keras.utils.to_categorical(y, 3), batch_size=BATCH, epochs=1, verbose=0)
                after = _keras_bn_values(m)
                stats = [
                    p
                    for p in before
                    if not _same(before[p], after[p], ("moving_mean", "moving_variance"))
                ]
                affine = [p for p in before if not _same(before[p], after[p], ("gamma", "beta"))]
                if stats:
                    row["failed"].append(f"{mode}: statistics of {stats[0]} moved")
                if mode == "frozen" and affine:
                    row["failed"].append(f"frozen: gamma/beta of {affine[0]} moved")
                if mode == "affine" and not affine:
                    row["failed"].append("affine: no gamma/beta moved")
                holds.append(f"{mode} ok" if not stats else f"{mode} MOVED")
            row["hold"] = ", ".join(holds)
            adapted = build()
            bnkit.adapt(adapted, x)
            if not all(
                np.isfinite(a).all() for v in _keras_bn_values(adapted).values() for a in v.values()
            ):
                row["failed"].append("adapt left non-finite statistics")
        report = bnkit.check(model, batch_size=32)
        row["check"] = f"{len(report.errors)} errors, {len(report.findings)} findings"
        row["bn021"] = _unestimated(bnkit.check(adapted)) if own else 0
        _export(row, model, adapted if own else None, "m.keras", check_data=x)
        return row

    return checks


def sweep_keras(names: list[str]) -> list[dict[str, Any]]:
    """Each model in a process of its own when there are several: Keras keeps what a
    build allocated, and forty models in one process outgrow 24 GB."""
    if len(names) > 1:
        return [_in_child("keras", name) for name in names]
    build, checks = _keras_checks(names[0])
    row = _row(names[0], build, checks)
    print(_line(row), file=sys.stderr, flush=True)
    return [row]


KERAS_HUB_SIZE = 32


def keras_hub_models() -> dict[str, Any]:
    """KerasHub's image classifiers, one per backbone family with BN, each built from a
    small config of that family's backbone class with random weights (a preset cannot be
    downloaded here): name -> a function that builds it."""
    import keras_hub

    m = keras_hub.models
    shape = (KERAS_HUB_SIZE, KERAS_HUB_SIZE, 3)
    resnet = dict(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=shape,
    )
    backbones = {
        "ResNet": lambda: (m.ResNetImageClassifier, m.ResNetBackbone(**resnet)),
        "ResNetV2": lambda: (m.ResNetImageClassifier,
                             m.ResNetBackbone(**resnet, use_pre_activation=True)),
        "CSPNet": lambda: (m.CSPNetImageClassifier, m.CSPNetBackbone(
            stem_filters=16, stem_kernel_size=3, stem_strides=1, stackwise_strides=2,
            stackwise_depth=[1, 1], stackwise_num_filters=[16, 32], down_growth=True,
            bottle_ratio=(0.5, 1.0), block_ratio=(1.0, 0.5), expand_ratio=(2.0, 1.0),
            block_type="dark_block", stage_type="csp", stem_padding="same",
            image_shape=shape)),
        "MobileNetV3": lambda: (m.MobileNetImageClassifier, m.MobileNetBackbone(
            stackwise_expansion=[[40, 56], [64, 144]], stackwise_num_blocks=[2, 2],
            stackwise_num_filters=[[16, 16], [24, 24]], stackwise_kernel_size=[[3, 3], [5, 5]],
            stackwise_num_strides=[[2, 1], [2, 1]], stackwise_se_ratio=[[None, None], [0.25, 0.25]],
            stackwise_activation=[["relu", "relu"], ["hard_swish", "hard_swish"]],
            stackwise_padding=[[1, 1], [2, 2]], output_num_filters=64, depthwise_filters=8,
            depthwise_stride=2, depthwise_residual=False, last_layer_filter=64,
            squeeze_and_excite=0.5, image_shape=shape)),
        "EfficientNet": lambda: (m.EfficientNetImageClassifier, m.EfficientNetBackbone(
            stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 1],
            stackwise_input_filters=[16, 16], stackwise_output_filters=[16, 24],
            stackwise_expansion_ratios=[1, 4], stackwise_squeeze_and_excite_ratios=[0.0, 0.25],
            stackwise_strides=[1, 2], stackwise_block_types=["fused", "unfused"],
            stackwise_force_input_filters=[0, 0], stackwise_nores_option=[False, False],
            width_coefficient=1.0, depth_coefficient=1.0, image_shape=shape)),
        "DenseNet": lambda: (m.DenseNetImageClassifier, m.DenseNetBackbone(
            stackwise_num_repeats=[1, 1], growth_rate=8, image_shape=shape)),
        "HGNetV2": lambda: (m.HGNetV2ImageClassifier, m.HGNetV2Backbone(
            embedding_size=32, stem_channels=[3, 16, 32], hidden_act="relu",
            use_learnable_affine_block=False, num_channels=3, image_shape=shape,
            depths=[1, 1], hidden_sizes=[64, 128],
            stackwise_stage_filters=[[32, 16, 64, 1, 1, 3], [64, 32, 128, 1, 1, 3]],
            apply_downsample=[False, True], use_lightweight_conv_block=[False, False])),
    }  # fmt: skip

    def classifier(name: str) -> Any:
        import keras

        keras.utils.set_random_seed(0)
        task, backbone = backbones[name]()
        return task(backbone=backbone, num_classes=3, preprocessor=None)

    return {name: (lambda name=name: classifier(name)) for name in backbones}


def sweep_keras_hub(names: list[str] | None) -> list[dict[str, Any]]:
    builders = keras_hub_models()
    rows = []
    for name in names or list(builders):
        checks = _keras_model_checks(builders[name], KERAS_HUB_SIZE)
        rows.append(_row(name, builders[name], checks))
        print(_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _in_child(source: str, name: str) -> dict[str, Any]:
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        proc = subprocess.run(
            [sys.executable, __file__, source, "--models", name, "--json", str(out)],
            capture_output=True, text=True,
        )  # fmt: skip
        if out.exists():
            return dict(json.loads(out.read_text())[0])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
    row = {"model": name, "status": f"FAILED: the process ended with {proc.returncode}: {tail}"}
    print(_line(row), file=sys.stderr, flush=True)
    return row


# ---------------------------------------------------------------------- output

COLUMNS = (
    "model", "params_m", "bn", "hold", "check", "bn021", "fold", "export", "seconds", "status",
)  # fmt: skip


def _line(row: dict[str, Any]) -> str:
    return "| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | params (M) | BN | frozen/affine through 2 steps | check | BN021 false "
        "positives | folded | export error | s | status |"
    )
    return "\n".join([head, "|" + "---|" * len(COLUMNS), *(_line(r) for r in rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", choices=["torchvision", "timm", "keras", "kerashub"])
    parser.add_argument("--models", help="comma-separated names (default: the whole zoo)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else None
    if args.source == "keras":
        rows = sweep_keras(names or keras_models())
    elif args.source == "kerashub":
        rows = sweep_keras_hub(names)
    else:
        if names is None and args.source == "torchvision":
            import torchvision

            names = torchvision.models.list_models(module=torchvision.models)
        rows = sweep_torch(args.source, names or list(TIMM_MODELS))
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    failed = [r for r in rows if r["status"].startswith("FAILED")]
    print(f"\n{len(rows)} models: {len(rows) - len(failed)} passed or refused in one line, "
          f"{len(failed)} failed", file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
