"""The bnkit command: output, files written atomically, and one clear line for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import build_transfer

import bnkit
from bnkit.cli import main
from bnkit.files import MARKER

IN_PROCESS = not os.environ.get("BNKIT_TEST_CLI_PROCESS")
"""`make test` runs this file once more with BNKIT_TEST_CLI_PROCESS=1 and KERAS_BACKEND
unset: every command then runs as a user runs it, in a new process where Keras picks its
default backend (an in-process run hides what the test runner imported first)."""


def run(capsys, *args: str) -> tuple[int, str, str]:
    if not IN_PROCESS:
        env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
        proc = subprocess.run(
            [sys.executable, "-m", "bnkit.cli", *args], env=env, capture_output=True, text=True
        )
        return proc.returncode, proc.stdout, proc.stderr
    sys.argv = ["bnkit", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_file(tmp_path) -> Path:
    model, _ = build_transfer()
    path = tmp_path / "model.keras"
    model.save(path)
    return path


def test_inspect_prints_table_and_json(capsys, model_file):
    code, out, _ = run(capsys, "inspect", str(model_file))
    assert code == 0
    assert "base/block2_preact_bn" in out and "4 BN layers: train 4" in out
    code, out, _ = run(capsys, "inspect", str(model_file), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["totals"]["bn_layers"] == 4
    code, out, _ = run(capsys, "inspect", str(model_file), "--bn-only")
    assert "stem_conv" not in out and "stem_bn" in out


def test_freeze_writes_a_pinned_model_and_leaves_the_input(capsys, model_file, tmp_path):
    before = digest(model_file)
    out_path = tmp_path / "frozen.keras"
    code, out, err = run(
        capsys,
        "freeze",
        str(model_file),
        "-o",
        str(out_path),
        "--train-from",
        "block2_conv",
        "--bn",
        "affine",
        "--rule",
        "re:preact_bn$=frozen",
    )
    assert code == 0, err
    assert digest(model_file) == before
    assert "wrote" in out
    loaded = keras.models.load_model(out_path)
    modes = {r.path: r.bn_mode for r in bnkit.inspect(loaded).bn_layers}
    assert modes == {
        "base/stem_bn": "frozen",
        "base/block1_bn": "frozen",
        "base/block2_preact_bn": "frozen",
        "base/block2_bn": "affine",
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def _corrupt(path: Path) -> Path:
    bad = path.with_name("corrupt.keras")
    data = path.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return bad


def _not_a_model(path: Path) -> Path:
    bad = path.with_name("text.keras")
    bad.write_text("this is not a model\n")
    return bad


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        ("missing", ["freeze", "{missing}", "-o", "{out}", "--bn", "frozen"], "no such file"),
        ("not a model", ["inspect", "{text}"], "not a Keras archive"),
        ("corrupt", ["freeze", "{corrupt}", "-o", "{out}", "--bn", "frozen"], "corrupt"),
        (
            "output is input",
            ["freeze", "{model}", "-o", "{model}", "--bn", "frozen"],
            "never overwrites",
        ),
        (
            "unknown layer",
            ["freeze", "{model}", "-o", "{out}", "--train-from", "block2_cnv"],
            "block2_conv",
        ),
        (
            "matches nothing",
            ["freeze", "{model}", "-o", "{out}", "--rule", "glob:zz*=frozen"],
            "matches no layer",
        ),
        ("bad mode", ["freeze", "{model}", "-o", "{out}", "--rule", "bn=melt"], "unknown BN mode"),
        ("no policy", ["freeze", "{model}", "-o", "{out}"], "needs a policy"),
        ("wrong suffix", ["freeze", "{model}", "-o", "{h5}", "--bn", "frozen"], "must end in"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(capsys, model_file, tmp_path, case, args, message):
    paths = {
        "missing": tmp_path / "missing.keras",
        "text": _not_a_model(model_file),
        "corrupt": _corrupt(model_file),
        "model": model_file,
        "out": tmp_path / "out.keras",
        "h5": tmp_path / "out.h5",
    }
    inputs = {k: digest(v) for k, v in paths.items() if v.exists()}
    code, out, err = run(capsys, *[a.format(**paths) for a in args])
    assert code == 2, (case, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnkit: error:"), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert {k: digest(v) for k, v in paths.items() if v.exists()} == inputs
    assert not paths["out"].exists()


def test_saved_model_reloads_when_bnkit_is_imported_before_keras(tmp_path):
    model, _ = build_transfer()
    bnkit.freeze(model, bn="affine")
    path = tmp_path / "affine.keras"
    model.save(path)
    code = (
        "import sys, bnkit\n"
        "assert 'keras' not in sys.modules and 'torch' not in sys.modules\n"
        "assert 'tensorflow' not in sys.modules\n"
        "import keras\n"
        f"m = keras.models.load_model({str(path)!r})\n"
        "print(sorted({r.bn_mode for r in bnkit.inspect(m).bn_layers}))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend()}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['affine']"


def test_tta_command_on_a_keras_model(capsys, model_file, tmp_path):
    data = tmp_path / "stream.npz"
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(40, 8, 8, 3)).astype("float32")
    np.savez(data, x=x, y=np.arange(40) % 3)
    before = digest(model_file), digest(data)
    out, report = tmp_path / "tent.keras", tmp_path / "tta.json"
    code, text, err = run(capsys, "tta", str(model_file), str(data), "-o", str(out),
                          "--report", str(report), "--batch-size", "20", "--method",
                          "tent")  # fmt: skip
    assert code == 0, err
    assert "tent: 40 samples in 2 batches, accuracy" in text
    doc = json.loads(report.read_text())
    assert [b["adapted"] for b in doc["batches"]] == [True, True]
    assert out.exists() and (digest(model_file), digest(data)) == before
    code, _, err = run(capsys, "tta", str(model_file), str(data), "--batch-size", "4",
                       "--method", "tent")  # fmt: skip
    assert code == 2 and "at least 16 (got 4)" in err and len(err.strip().splitlines()) == 1
    code, text, err = run(capsys, "tta", str(model_file), str(data), "--batch-size", "4")
    assert code == 0 and "robust: 40 samples in 10 batches" in text, err  # the default


def test_adapt_command_writes_model_with_new_statistics(capsys, model_file, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "target.npz"
    np.savez(data, x=rng.normal(3.0, 2.0, size=(20, 8, 8, 3)).astype("float32"))
    before = digest(model_file)
    out_path = tmp_path / "adapted.keras"
    code, out, err = run(
        capsys,
        "adapt",
        str(model_file),
        str(data),
        "-o",
        str(out_path),
        "--batch-size",
        "8",
        "--json",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["batches"], doc["samples"], len(doc["layers"])) == (3, 20, 4)
    assert digest(model_file) == before
    old = keras.models.load_model(model_file).get_layer("base").get_layer("stem_bn")
    new = keras.models.load_model(out_path).get_layer("base").get_layer("stem_bn")
    assert not np.allclose(
        keras.ops.convert_to_numpy(old.moving_mean), keras.ops.convert_to_numpy(new.moving_mean)
    )


def test_a_keras_model_under_torchrun_is_refused_in_one_line(capsys, model_file, tmp_path,
                                                             monkeypatch):  # fmt: skip
    data = tmp_path / "target.npz"
    np.savez(data, x=np.zeros((8, 8, 8, 3), "float32"))
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)  # what torchrun sets in each process
    out_path = tmp_path / "adapted.keras"
    code, _, err = run(capsys, "adapt", str(model_file), str(data), "-o", str(out_path))
    assert code == 2 and _one_line(err)
    assert "one of 2 processes (WORLD_SIZE), but a Keras model's statistics" in err
    assert not out_path.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"not an npz", "not a readable .npz"),
        ({"z": np.zeros((2, 8, 8, 3))}, "no array named 'x'"),
        ({"x": np.full((2, 8, 8, 3), np.nan)}, "NaN or inf"),
        ({"x": np.zeros((2, 8, 8, 3)), "y": np.zeros(3)}, "'y' has 3"),
    ],
)
def test_adapt_bad_data_gets_one_line(capsys, model_file, tmp_path, content, message):
    data = tmp_path / "d.npz"
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        np.savez(data, **content)
    out_path = tmp_path / "adapted.keras"
    code, _, err = run(capsys, "adapt", str(model_file), str(data), "-o", str(out_path))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not out_path.exists()


def test_shift_command_prints_table_json_and_plot(capsys, model_file, tmp_path):
    data = tmp_path / "target.npz"
    rng = np.random.default_rng(1)
    np.savez(data, x=rng.normal(3.0, 2.0, size=(12, 8, 8, 3)).astype("float32"))
    plot = tmp_path / "shift.png"
    code, out, err = run(capsys, "shift", str(model_file), str(data), "--plot", str(plot))
    assert code == 0, err
    assert "base/stem_bn" in out and "model shift" in out and f"wrote {plot}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run(capsys, "shift", str(model_file), str(data), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["samples"] == 12 and len(doc["layers"]) == 4
    assert doc["recommendation"] in ("frozen", "adapt", "labels")


def test_adapt_and_shift_read_an_image_folder_resized_to_the_model(capsys, model_file, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, size=(20, 30, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.jpg")
    args = [str(model_file), str(tmp_path / "imgs"), "--scale", "1/255"]
    code, out, err = run(capsys, "shift", *args, "--json")
    assert code == 0, err
    assert json.loads(out)["samples"] == 6
    code, out, err = run(capsys, "adapt", *args, "-o", str(tmp_path / "a.keras"), "--json")
    assert code == 0 and json.loads(out)["samples"] == 6, err


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        (lambda p: p.mkdir(), [], "the directory is empty"),
        (lambda p: np.savez(p, x=np.zeros((2, 8, 8, 1))), [], "convert the channels"),
        (lambda p: np.savez(p, x=np.zeros((2, 3, 8, 8))), [], "transpose(0, 2, 3, 1)"),
        (lambda p: np.savez(p, x=np.zeros((2, 8, 8, 3))), ["--scale", "x"], "cannot read scale"),
        (lambda p: np.savez(p, x=np.zeros((2, 8, 8, 3))), ["--plot", "s.txt"], "end in '.png'"),
    ],
    ids=["empty-folder", "channels", "channels-first", "bad-scale", "plot-suffix"],
)
def test_shift_bad_input_gets_one_line(capsys, model_file, tmp_path, setup, extra, message):
    data = tmp_path / "d.npz"
    setup(data)
    extra = [str(tmp_path / e) if e.endswith(".txt") else e for e in extra]
    code, _, err = run(capsys, "shift", str(model_file), str(data), *extra)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


@pytest.mark.skipif(
    keras.backend.backend() == "jax" and IN_PROCESS,
    reason="pretraining the digits model takes two minutes on JAX: the torch and TensorFlow "
    "passes run this command",
)
@pytest.mark.slow
def test_digits_command_writes_data_model_and_evidence(capsys, tmp_path):
    folder = tmp_path / "digits"
    code, out, err = run(capsys, "digits", "-o", str(folder))
    assert code == 0, err
    assert "after adapt on unlabelled target images" in out
    names = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    assert (folder / MARKER).is_file()  # what lets a later run replace these files
    assert names == sorted(
        ["digits-resnet.keras"]
        + [f"{d}_{s}.npz" for d in ("source", "target") for s in ("train", "val", "test")]
    )
    scores = {}
    for domain in ("source", "target"):
        data = folder / f"{domain}_test.npz"
        code, out, _ = run(
            capsys, "shift", str(folder / "digits-resnet.keras"), str(data), "--json"
        )
        scores[domain] = json.loads(out)["score"]
    assert scores["target"] > 10 * scores["source"]


def _labelled_npz(path: Path, n: int, seed: int, labels: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 1.0, size=(n, 8, 8, 3)).astype("float32")
    arrays = {"x": x, "y": rng.integers(0, 3, size=n)} if labels else {"x": x}
    np.savez(path, **arrays)
    return path


def test_compare_command_prints_table_and_writes_json_and_plot(capsys, model_file, tmp_path):
    train = _labelled_npz(tmp_path / "train.npz", 24, 0)
    val = _labelled_npz(tmp_path / "val.npz", 12, 1)
    out_dir = tmp_path / "results"
    code, out, err = run(
        capsys, "compare", str(model_file), str(train), "--val", str(val),
        "--strategies", "frozen,train,mine:bn=frozen;glob:block2_*=train",
        "--epochs", "2", "--seeds", "2", "--batch-size", "8", "-o", str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    assert "mean ± std over 2 seeds" in out and "mine" in out
    doc = json.loads((out_dir / "compare.json").read_text())
    assert len(doc["runs"]) == 6 and {s["strategy"] for s in doc["summaries"]} == {
        "frozen",
        "train",
        "mine",
    }
    assert (out_dir / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # a second run refuses the existing results unless told, then replaces only them
    (out_dir / "notes.txt").write_text("the user's")
    again = ["compare", str(model_file), str(train), "--val", str(val), "--strategies",
             "frozen", "--epochs", "1", "--seeds", "1", "-o", str(out_dir)]  # fmt: skip
    before = digest(out_dir / "compare.json")
    code, _, err = run(capsys, *again)
    assert code == 2 and "from an earlier run; pass --overwrite" in _one_line(err)
    assert digest(out_dir / "compare.json") == before
    code, _, err = run(capsys, *again, "--overwrite")
    assert code == 0, err
    assert len(json.loads((out_dir / "compare.json").read_text())["runs"]) == 1
    assert (out_dir / "notes.txt").read_text() == "the user's"


def foreground() -> None:
    """In the child: Ctrl-C as in a terminal's foreground job, whatever this process
    inherited (a test process started with SIGINT ignored passes that on, as a shell's
    background jobs do: then Ctrl-C rightly does nothing)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _imported(line: str) -> str:
    """The module a `-X importtime` line names ("" for any other line)."""
    return line.rsplit("|", 1)[-1].strip() if line.startswith("import time:") else ""


@pytest.mark.parametrize(
    ("launch", "when"),
    [
        ("console-script", "start-up"),
        ("python-m", "start-up"),
        ("python-m", "work"),
    ],
)
def test_interrupted_by_ctrl_c_exits_130_and_leaves_nothing(model_file, tmp_path, launch, when):
    import signal

    out = tmp_path / "frozen.keras"
    command = {
        "console-script": [str(Path(sys.executable).with_name("bnkit"))],
        "python-m": [sys.executable, "-m", "bnkit.cli"],
    }[launch]
    # start-up: as soon as bnkit's first module is imported, while NumPy and the rest are
    # still to come; work: once the command has begun importing the framework
    ready = {
        "start-up": lambda module: module == "bnkit._launch",
        "work": lambda module: module.startswith(("keras", "tensorflow")),
    }[when]
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["PYTHONPROFILEIMPORTTIME"] = "1"  # one stderr line per import, as each one ends
    proc = subprocess.Popen([*command, "freeze", str(model_file), "-o", str(out), "--bn",
                             "frozen"], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=foreground)  # fmt: skip
    assert proc.stderr is not None
    before = []
    for line in proc.stderr:
        before.append(line)
        if ready(_imported(line)):
            break
    proc.send_signal(signal.SIGINT)
    err = "".join(before) + proc.stderr.read()
    proc.wait(timeout=120)
    ours = [line for line in err.splitlines() if line.strip() and not _imported(line)]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert ours[-1] == "bnkit: interrupted; no partial output was left", ours
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["model.keras"]


@pytest.mark.parametrize(
    ("argv", "orig_argv", "command"),
    [
        (["/venv/bin/bnkit", "check", "m.keras"], ["python", "/venv/bin/bnkit", "check"], True),
        (["-m"], ["python", "-X", "importtime", "-m", "bnkit.cli", "check"], True),
        (["-m"], ["python", "-mbnkit.cli"], True),
        (["-m"], ["python", "-m", "pytest", "tests"], False),
        (["-c"], ["python", "-c", "import bnkit", "-m", "bnkit.cli"], False),
        (["train.py"], ["python", "train.py", "-m", "bnkit.cli"], False),
        ([""], ["python"], False),
    ],
)
def test_only_the_command_takes_ctrl_c_over_while_it_starts(argv, orig_argv, command):
    from bnkit._launch import started_as_command

    assert started_as_command(argv, orig_argv) is command


def test_warnings_print_after_the_command_one_line_each(capsys, model_file, tmp_path):
    compiled = tmp_path / "compiled.keras"
    model = keras.models.load_model(model_file)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.save(compiled)
    code, _, err = run(capsys, "freeze", str(compiled), "-o", str(tmp_path / "f.keras"),
                       "--bn", "frozen")  # fmt: skip
    assert code == 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("bnkit: warning: ") for line in lines), err
    assert any("was compiled before freeze" in line for line in lines)


@pytest.mark.parametrize(
    ("val_labels", "extra", "message"),
    [
        (False, [], "validation data has no labels"),
        (True, ["--strategies", "frozn"], "frozn"),
    ],
    ids=["no-labels", "unknown-strategy"],
)
def test_compare_bad_input_gets_one_line(capsys, model_file, tmp_path, val_labels, extra, message):
    train = _labelled_npz(tmp_path / "train.npz", 8, 0)
    val = _labelled_npz(tmp_path / "val.npz", 8, 1, labels=val_labels)
    code, _, err = run(capsys, "compare", str(model_file), str(train), "--val", str(val), *extra)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_check_command_exits_1_on_errors_and_0_when_clean(capsys, model_file, tmp_path):
    code, out, _ = run(capsys, "check", str(model_file), "--batch-size", "4")
    assert code == 1 and "BN001" in out and "BN004" in out
    code, out, _ = run(capsys, "check", str(model_file), "--json")
    assert code == 1 and {f["code"] for f in json.loads(out)["findings"]} == {"BN001"}
    frozen = tmp_path / "frozen.keras"
    assert run(capsys, "freeze", str(model_file), "-o", str(frozen), "--bn", "frozen")[0] == 0
    code, out, _ = run(capsys, "check", str(frozen))
    assert code == 0 and "0 errors" in out


def test_export_command_writes_a_verified_model_and_leaves_the_input(capsys, model_file, tmp_path):
    before = digest(model_file)
    data = tmp_path / "check.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype("float32"))
    out_path = tmp_path / "deploy.keras"
    code, out, err = run(
        capsys, "export", str(model_file), "-o", str(out_path), "--val", str(data), "--json"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["folded"], doc["kept"], doc["samples"]) == (3, 1, 5)
    assert digest(model_file) == before and out_path.exists()
    code, _, err = run(capsys, "export", str(model_file), "-o", str(model_file))
    assert code == 2 and "never overwrites its input" in err


# ---------------------------------------------------------------------- hostile input


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("where", ["folder", "cwd"])
def test_export_savedmodel_never_removes_an_existing_folder(
    capsys, model_file, tmp_path, monkeypatch, where
):
    (tmp_path / "notes.txt").write_text("keep me")
    before = {p.name: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    monkeypatch.chdir(tmp_path)
    out = "." if where == "cwd" else str(tmp_path)
    for extra in ([], ["--overwrite"]):
        code, _, err = run(
            capsys, "export", str(model_file), "-o", out, "--format", "savedmodel", *extra
        )
        assert code == 2 and _one_line(err).startswith("bnkit: error:")
    assert {p.name: digest(p) for p in tmp_path.iterdir() if p.is_file()} == before


def test_export_replaces_only_its_own_output_when_asked(capsys, model_file, tmp_path):
    out = tmp_path / "deploy.keras"
    assert run(capsys, "export", str(model_file), "-o", str(out))[0] == 0
    code, _, err = run(capsys, "export", str(model_file), "-o", str(out))
    assert code == 2 and "--overwrite" in _one_line(err)
    assert run(capsys, "export", str(model_file), "-o", str(out), "--overwrite")[0] == 0
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("kind", ["unwritable", "long", "loop"])
@pytest.mark.parametrize("command", ["freeze", "adapt", "export", "shift", "compare"])
def test_bad_output_paths_get_one_line_and_exit_2(capsys, model_file, tmp_path, kind, command):
    if kind == "unwritable":
        folder = tmp_path / "locked"
        folder.mkdir()
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            folder = Path("/sys")
    elif kind == "loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        folder = tmp_path / "loop"
    else:
        folder = tmp_path
    name = ("x" * 300 if kind == "long" else "out") + (".png" if command == "shift" else ".keras")
    data = _labelled_npz(tmp_path / "d.npz", 8, 0)
    args = {
        "freeze": ["freeze", str(model_file), "--bn", "frozen", "-o", str(folder / name)],
        "adapt": ["adapt", str(model_file), str(data), "-o", str(folder / name)],
        "export": ["export", str(model_file), "-o", str(folder / name)],
        "shift": ["shift", str(model_file), str(data), "--plot", str(folder / name)],
        "compare": ["compare", str(model_file), str(data), "--val", str(data),
                    "-o", str(folder / name.replace(".keras", ""))],
    }[command]  # fmt: skip
    try:
        code, _, err = run(capsys, *args)
    finally:
        if kind == "unwritable" and folder != Path("/sys"):
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert code == 2 and _one_line(err).startswith("bnkit: error:"), err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty (0 bytes)"),
        ("truncated", "not a readable .npz"),
        ({"x": np.array(["a", "b"])}, "not numbers"),
        ({"x": np.float32(3.0)}, "single value"),
    ],
    ids=["0-byte", "truncated", "strings", "0-d"],
)
def test_unreadable_npz_gets_one_line(capsys, model_file, tmp_path, content, message):
    data = tmp_path / "d.npz"
    if content == "truncated":
        np.savez(data, x=np.zeros((4, 8, 8, 3), "float32"))
        data.write_bytes(data.read_bytes()[:200])
    elif isinstance(content, bytes):
        data.write_bytes(content)
    else:
        np.savez(data, **content)
    code, _, err = run(capsys, "shift", str(model_file), str(data))
    assert code == 2 and message in _one_line(err)


@pytest.mark.parametrize(
    ("x", "args", "message"),
    [
        (np.full((4, 8, 8, 3), 1.0), ["--scale", "nan"], "finite, non-zero"),
        (np.random.default_rng(0).uniform(1e29, 1e30, (4, 8, 8, 3)), [], "not finite"),
        (np.full((4, 8, 8, 3), 1.0), ["--max-batches", "0"], "--max-batches"),
    ],
    ids=["scale-nan", "huge-values", "max-batches-0"],
)
def test_adapt_never_writes_a_model_with_non_finite_statistics(
    capsys, model_file, tmp_path, x, args, message
):
    data = tmp_path / "d.npz"
    np.savez(data, x=x.astype("float32"))
    out = tmp_path / "adapted.keras"
    code, _, err = run(capsys, "adapt", str(model_file), str(data), "-o", str(out), *args)
    assert code == 2 and message in _one_line(err)
    assert not out.exists()


@pytest.mark.parametrize(
    ("labels", "extra", "message"),
    [
        (None, ["--lr", "nan"], "learning rate"),
        (None, ["--strategies", "frozen,frozen"], "named twice"),
        (np.array([0.5, 1, 2, 0, 1, 2, 0, 1]), [], "non-integer labels"),
        (np.array(["a", "b"] * 4), [], "labels"),
    ],
    ids=["lr-nan", "duplicate", "float-labels", "string-labels"],
)
def test_compare_refuses_what_would_give_a_wrong_verdict(
    capsys, model_file, tmp_path, labels, extra, message
):
    train = _labelled_npz(tmp_path / "train.npz", 8, 0)
    if labels is not None:
        np.savez(train, x=np.load(train)["x"], y=labels)
    code, _, err = run(capsys, "compare", str(model_file), str(train), "--val", str(train), *extra)
    assert code == 2 and message in _one_line(err)


@pytest.mark.parametrize(
    "args",
    [
        ["traps", "--image-size", "1"],
        ["traps", "--train-steps", "0"],
        ["check", "{model}", "--train-steps", "-5"],
        ["check", "{model}", "--batch-size", "0"],
        ["demo", "--labels-per-class", "0", "-o", "{tmp}/demo"],
        ["digits", "-o", "{tmp}/digits", "--image-size", "2"],
    ],
)
def test_out_of_range_numbers_get_one_line_and_create_nothing(capsys, model_file, tmp_path, args):
    args = [a.format(model=model_file, tmp=tmp_path) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run(capsys, *args)
    assert code == 2 and _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_check_select_matching_nothing_is_an_error(capsys, model_file):
    code, _, err = run(capsys, "check", str(model_file), "--select", "glob:zz*")
    assert code == 2 and "matches no layer" in _one_line(err)


def test_digits_never_overwrites_a_users_files(capsys, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "source_train.npz").write_text("the user's")
    code, _, err = run(capsys, "digits", "-o", str(folder))
    assert code == 2 and "did not write" in _one_line(err)
    assert (folder / "source_train.npz").read_text() == "the user's"


def test_bad_rules_and_layer_names_are_reported_before_the_framework_starts(model_file, tmp_path):
    code = (
        "import sys\n"
        "from bnkit.cli import main\n"
        f"sys.argv = ['bnkit', 'freeze', {str(model_file)!r}, '-o', "
        f"{str(tmp_path / 'o.keras')!r}, '--train-from', 'block2_cnv']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(code, 'keras' in sys.modules, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr
    assert "block2_conv" in proc.stderr


@pytest.mark.parametrize("command", ["freeze", "compare", "export", "export-onnx"])
def test_commands_on_the_torch_backend_do_not_import_tensorflow(model_file, tmp_path, command):
    if keras.backend.backend() != "torch":
        pytest.skip("about the torch backend")
    data = _labelled_npz(tmp_path / "d.npz", 8, 0)
    args = {
        "freeze": [str(model_file), "-o", str(tmp_path / "o.keras"), "--bn", "frozen"],
        "compare": [str(model_file), str(data), "--val", str(data), "--epochs", "1",
                    "--seeds", "1", "--strategies", "frozen", "-o", str(tmp_path / "r")],
        "export": [str(model_file), "-o", str(tmp_path / "d.keras")],
        "export-onnx": [str(model_file), "-o", str(tmp_path / "d.onnx")],
    }[command]  # fmt: skip
    command = command.split("-")[0]
    code = (
        "import sys\n"
        "from bnkit.cli import main\n"
        f"sys.argv = ['bnkit', {command!r}, *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code)\n"
        "print('tensorflow' in sys.modules)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.stdout.split()[-1] == "False", proc.stdout + proc.stderr
    assert "oneDNN" not in proc.stderr and "exit 2" not in proc.stdout


def test_a_model_compiled_on_torch_is_written_loadable_on_every_backend(tmp_path):
    model, _ = build_transfer()
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    bnkit.freeze(model, bn="frozen")
    from bnkit.backends import save_model

    save_model(model, tmp_path / "out.keras")
    with zipfile.ZipFile(tmp_path / "out.keras") as z:
        optimizer = json.loads(z.read("config.json"))["compile_config"]["optimizer"]
    # the torch backend's own model.save names keras.src.backend.torch.optimizers.torch_adam,
    # which only the torch backend can load
    assert (optimizer["module"], optimizer["class_name"]) == ("keras.optimizers", "Adam")
    assert "get_compile_config" not in vars(model)
