"""The demo's claims about each approach, measured on the real ResNet50V2."""

from __future__ import annotations

import json

import keras
import pytest

from bnkit.demo import seed_demo

NOT_ON_JAX = pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="the demo is told on the torch and TensorFlow backends (README): on JAX each "
    "approach and run compiles its own train step, three minutes of compiling per test",
)


@pytest.mark.slow
@NOT_ON_JAX
def test_seed_demo_shows_what_each_approach_does():
    result = seed_demo(steps=1)
    rows = {r.approach: r for r in result.rows}
    assert all(r.bn_layers == 49 for r in result.rows)
    keras_flag = rows["bn.trainable = False (every BN)"]
    assert (keras_flag.stats_kept, keras_flag.affine_kept) == (49, 49)
    assert rows["bn.trainable = False, then base.trainable = True"].stats_kept == 0
    assert rows["base(x, training=False), then base.trainable = True"].stats_kept == 0
    by_prefix = rows["BN picked by name.startswith('bn')"]
    assert (by_prefix.targeted, by_prefix.stats_kept) == (0, 0)
    preact = rows["BN picked by 'preact_bn' in name"]
    assert (preact.targeted, preact.stats_kept) == (16, 16)
    expected = {"frozen": (49, 49), "affine": (49, 0), "train": (0, 0), "adapt": (49, 49)}
    for mode, (stats, affine) in expected.items():
        row = rows[f"bnkit.freeze(bn='{mode}'), then base.trainable = True"]
        assert (row.stats_kept, row.affine_kept, row.problems) == (stats, affine, 0)
    assert len(json.loads(result.to_json())["rows"]) == 9


@pytest.mark.slow
@NOT_ON_JAX
def test_demo_command_tells_the_digits_story_and_writes_figures(tmp_path, capsys):
    from test_cli import run

    out = tmp_path / "demo"
    code, text, err = run(
        capsys, "demo", "--skip-traps", "-o", str(out),
        "--labels-per-class", "3", "--epochs", "1", "--seeds", "2",
    )  # fmt: skip
    assert code == 0, err
    for marker in ("held-out source digits", "BN input shift", "after adapt", "mean ± std over 2"):
        assert marker in text
    doc = json.loads((out / "demo.json").read_text())
    assert doc["labelled"] == 30 and doc["inspect"]["bn_layers"] == 9
    assert doc["shift"]["recommendation"] == "labels"  # target shift above 0.03
    assert len(doc["compare"]["runs"]) == 8  # four strategies, two seeds
    ev = doc["without_labels"]
    assert ev["shift_target"] > 20 * ev["shift_source"]
    for name in ("shift.png", "compare.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "compare.json").read_text())["best"] == doc["compare"]["best"]
    assert doc["framework"] == "keras" and doc["epochs"] == 1 and doc["seeds"] == 2
    assert doc["versions"].startswith(f"keras {keras.__version__} ({keras.backend.backend()})")


def _docs_hooks():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "hooks.py"
    spec = importlib.util.spec_from_file_location("bnkit_docs_hooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_show_the_recorded_demo_run_and_refuse_a_stale_one(tmp_path, monkeypatch):
    hooks = _docs_hooks()
    section = hooks.demo_section()  # the record in docs/demo/, as the site build reads it
    for name in ("demo.json", "demo-torch.json"):
        doc = json.loads((hooks.DEMO_RECORD / name).read_text())
        for s in doc["compare"]["summaries"]:
            cell = f"{s['val_accuracy_mean']:.1%} ± {s['val_accuracy_std']:.1%}"
            assert cell in section.split(f"| {s['strategy']} |")[1].splitlines()[0]
        assert doc["compare"]["verdict"] in section
    stale = json.loads((hooks.DEMO_RECORD / "demo.json").read_text())
    stale["epochs"] += 1
    (tmp_path / "demo.json").write_text(json.dumps(stale))
    monkeypatch.setattr(hooks, "DEMO_RECORD", tmp_path)
    with pytest.raises(ValueError, match="make docs-demo"):
        hooks.demo_section()
