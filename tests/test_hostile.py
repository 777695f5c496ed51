"""The hostile-input suite: the command line as a careless or hostile user runs it, in a
new process with KERAS_BACKEND unset, on every kind of bad input. Each case must end in
one line on stderr starting 'bnkit: error:', exit 2 (130 for Ctrl-C), no hang, and
nothing of the user's changed: every file in the workspace is hashed before and after,
and no file may appear (bnkit writes nothing when it refuses)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
import stat
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import build_transfer

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="runs the command in new processes with KERAS_BACKEND unset: once, in the torch pass",
)

NETS = """
import sys
import torch
from torch import nn
from shutil import rmtree  # a standard-library function a typo could reach


class Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(self.stem(x).mean(dim=(2, 3)))


def build(classes=3):
    torch.manual_seed(0)
    return Net(classes)


def half():
    return build().half()


def raises():
    raise ValueError("the user's factory is broken")


def exits0():
    sys.exit(0)


def not_a_module():
    return 42


def nobn():
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.GroupNorm(1, 2), nn.Flatten(), nn.LazyLinear(3))


def sleeper():
    import pathlib
    import time

    pathlib.Path("factory-started").touch()
    time.sleep(120)
    return build()


def stuck():
    import time

    time.sleep(600)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
"""


class Evil:
    """A pickle that runs code when loaded: it would create the file `pwned`."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG file whose header claims `width` x `height` pixels (a decompression bomb)."""
    from PIL import Image

    Image.new("RGB", (2, 2)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # type, width, height, depth, colour, ...
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def _folder(root: Path, classes: dict[str, str]) -> Path:
    from PIL import Image

    for cls, mode in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new(mode, (6, 6), color=(i * 40,) * len(mode)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The workspace every case runs in: models, weights and data, good and bad."""
    import torch

    root = tmp_path_factory.mktemp("hostile")
    model, _ = build_transfer()
    model.save(root / "model.keras")
    (root / "nets.py").write_text(NETS)
    (root / "exits.py").write_text("import sys\nsys.exit(3)\n")
    sys.path.insert(0, str(root))
    try:
        import nets
    finally:
        sys.path.remove(str(root))
    good = nets.build().state_dict()
    torch.save(good, root / "good.pt")
    nan = {k: v.clone() for k, v in good.items()}
    nan["stem.1.running_var"][0] = float("nan")
    torch.save(nan, root / "nan.pt")
    torch.save({i: v for i, v in enumerate(good.values())}, root / "intkeys.pt")
    torch.save({**good, "head.weight": good["head.weight"].to_sparse()}, root / "sparse.pt")
    torch.save({k: v.to("meta") for k, v in good.items()}, root / "meta.pt")
    torch.save({**good, "head.weight": good["head.weight"].to(torch.complex64)}, root / "cx.pt")
    torch.save({"w" + k: v for k, v in good.items()}, root / "wrongkeys.pt")
    torch.save(nets.build(classes=5).state_dict(), root / "wrongshape.pt")
    torch.save(nets.build(), root / "module.pt")
    (root / "evil.pt").write_bytes(pickle.dumps(Evil()))
    (root / "notes.pt").write_text("my notes, not a model\n")
    (root / "empty.pt").write_bytes(b"")
    (root / "weights_dir").mkdir()
    (root / "fresh.plan.json").write_text(json.dumps({"mine": True}))
    rng = np.random.default_rng(0)
    nhwc = rng.normal(0.5, 1.0, (24, 8, 8, 3)).astype("float32")
    nchw = rng.normal(0.5, 1.0, (24, 3, 6, 6)).astype("float32")
    labels = np.arange(24) % 3
    np.savez(root / "good.npz", x=nhwc, y=labels)
    np.savez(root / "nchw.npz", x=nchw, y=labels)
    np.savez(root / "complex.npz", x=nhwc.astype("complex64"))
    np.savez(root / "zeros.npz", x=np.zeros_like(nhwc))
    np.savez(root / "hugelabel.npz", x=nhwc, y=np.where(labels == 2, 10**9, labels))
    np.savez(root / "hugelabel_nchw.npz", x=nchw, y=np.where(labels == 2, 10**9, labels))
    np.savez(root / "nan.npz", x=np.where(nhwc > 2, np.nan, nhwc))
    np.savez(root / "twochannel.npz", x=nhwc[..., :2])
    np.savez(root / "rgba.npz", x=np.concatenate([nhwc, nhwc[..., :1]], axis=-1))
    np.savez(root / "small.npz", x=nchw[:12], y=labels[:12])
    np.savez(root / "strings.npz", x=np.array(["a", "b"]))
    np.savez(root / "mismatch.npz", x=nhwc, y=labels[:5])
    np.savez(root / "mlp.npz", x=rng.normal(size=(33, 4)).astype("float32"))
    _folder(root / "folder_ab", {"a": "RGB", "b": "RGB"})
    _folder(root / "folder_bc", {"b": "RGB", "c": "RGB"})
    _folder(root / "folder_rgba", {"a": "RGBA", "b": "RGBA"})
    _folder(root / "folder_pipe", {"a": "RGB", "b": "RGB"})
    os.mkfifo(root / "folder_pipe" / "a" / "stuck.png")
    _folder(root / "folder_bomb", {"a": "RGB", "b": "RGB"})
    _png_claiming(root / "folder_bomb" / "a" / "bomb.png", 100_000, 100_000)
    (root / "noclasses").mkdir()
    (root / "noclasses" / "x.png").write_bytes(b"")
    os.mkfifo(root / "pipe.keras")
    os.mkfifo(root / "pipe.npz")
    (root / "legacy.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    with zipfile.ZipFile(root / "noconfig.keras", "w") as z:
        z.writestr("metadata.json", "{}")
    with zipfile.ZipFile(root / "badconfig.keras", "w") as z:
        z.writestr("config.json", "{not json")
        z.writestr("metadata.json", "{}")
    with (
        zipfile.ZipFile(root / "bomb.keras", "w", zipfile.ZIP_DEFLATED) as z,
        z.open("config.json", "w", force_zip64=True) as f,
    ):
        for _ in range(300):
            f.write(b" " * 2**20)
    for name, member in (("bomb.npz", "x.npy"), ("bomb.pt", "archive/data/0")):
        with (
            zipfile.ZipFile(root / name, "w", zipfile.ZIP_DEFLATED) as z,
            z.open(member, "w", force_zip64=True) as f,
        ):
            for _ in range(300):
                f.write(b"\0" * 2**20)
    shutil.copy(root / "folder_ab" / "a" / "0.png", root / "photo.png")  # the user's own
    _folder(root / "folder_mixed", {"a": "RGB", "b": "RGB"})
    from PIL import Image

    Image.new("RGB", (9, 7)).save(root / "folder_mixed" / "a" / "1.png")
    (root / "afile").write_text("a file, not a folder")
    (root / "victim").mkdir()
    (root / "victim" / "keep.txt").write_text("the user's")
    (root / "results").mkdir()
    (root / "results" / "compare.json").write_text("the user's own results")
    (root / "loop").symlink_to(root / "loop")
    return root


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with a digest of its content (files) or its kind."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if "__pycache__" in rel:
            continue
        mode = path.lstat().st_mode
        if stat.S_ISREG(mode):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = stat.filemode(mode)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    message: str
    env: dict[str, str] = field(default_factory=dict)


def case(id: str, *args: str, message: str, **env: str) -> Case:
    return Case(id, args, message, env)


K, S = "model.keras", "nets.py:build"
CASES = [
    # --- outputs inside input folders, the user's own images (issue 33)
    case("shift-plot-over-an-input-image", "shift", K, "folder_ab", "--plot",
         "folder_ab/a/0.png", "--overwrite", message="a folder this command reads"),
    case("tta-plot-over-an-input-image", "tta", K, "folder_ab", "--plot",
         "folder_ab/b/0.png", "--overwrite", message="a folder this command reads"),
    case("compare-output-in-a-class-folder", "compare", K, "folder_ab", "--val", "good.npz",
         "-o", "folder_ab/a", message="a folder this command reads"),
    case("shift-plot-over-the-users-png", "shift", K, "good.npz", "--plot", "photo.png",
         "--overwrite", message="is not a '.png' file bnkit writes"),
    case("a-factory-that-never-returns-with-timeout", "inspect", "nets.py:stuck", "--timeout",
         "2", message="did not return within 2 s (--timeout)"),
    case("tent-on-images-of-mixed-sizes", "tta", S, "folder_mixed", "--method", "tent",
         "--batch-size", "16", "--scale", "1/255", message="give --image-size N"),
    case("tent-steps-that-never-end", "tta", K, "good.npz", "--method", "tent",
         "--tent-steps", "1000000000000", message="--tent-steps"),
    case("epochs-that-never-end", "compare", K, "good.npz", "--val", "good.npz", "-o", "cmp",
         "--epochs", "100000000000000000000", message="--epochs"),
    case("seeds-beyond-any-integer", "compare", K, "good.npz", "--val", "good.npz", "-o",
         "cmp", "--seeds", "100000000000000000000", message="--seeds"),
    case("digits-of-65-tib", "digits", "-o", "dd", "--image-size", "100000",
         message="--image-size"),
    case("complex-weights-freeze", "freeze", S, "--weights", "cx.pt", "-o", "cx-out.pt",
         "--bn", "frozen", message="holds complex numbers"),
    case("complex-weights-adapt", "adapt", S, "--weights", "cx.pt", "nchw.npz", "-o",
         "cx-out.pt", message="holds complex numbers"),
    # --- something of the user's replaced or destroyed (issue 24)
    case("overwrite-users-text-as-pt", "freeze", S, "-o", "notes.pt", "--bn", "frozen",
         "--overwrite", message="is not a '.pt' file bnkit writes"),
    case("overwrite-users-json-as-plan", "freeze", S, "-o", "fresh.pt", "--bn", "frozen",
         "--overwrite", message="is not a '.json' file bnkit writes"),
    case("nan-weights-write-no-plan", "freeze", S, "--weights", "nan.pt", "-o", "out.pt",
         "--bn", "frozen", message="NaN or inf"),
    case("stdlib-callable", "inspect", "shutil:rmtree", "--args", '{"path": "victim"}',
         message="standard library"),
    case("stdlib-callable-through-a-module", "inspect", "nets.py:rmtree", "--args",
         '{"path": "victim"}', message="standard library"),
    case("builtins-callable", "inspect", "builtins:exec", "--args", '{"source": "1"}',
         message="standard library"),
    # --- wrong results written with exit 0 (issue 24)
    case("complex-data", "adapt", K, "complex.npz", "-o", "out.keras", message="complex"),
    case("scale-underflows", "adapt", K, "good.npz", "-o", "out.keras", "--scale", "1e-300",
         message="underflows"),
    case("scale-underflows-50", "adapt", K, "good.npz", "-o", "out.keras", "--scale", "1e-50",
         message="underflows"),
    case("all-zero-data", "adapt", K, "zeros.npz", "-o", "out.keras", message="every input value"),
    # --- hangs (issue 24)
    case("pipe-as-model", "inspect", "pipe.keras", message="named pipe"),
    case("pipe-as-data", "shift", K, "pipe.npz", message="named pipe"),
    case("pipe-in-image-folder", "adapt", K, "folder_pipe", "-o", "out.keras",
         message="not a regular file"),
    # --- tracebacks (issue 24)
    case("config-not-json", "freeze", "badconfig.keras", "-o", "out.keras", "--bn", "frozen",
         message="not valid JSON"),
    case("device-as-model", "inspect", "/dev/zero", message="unsupported model file type"),
    case("device-as-data", "shift", K, "/dev/zero", message="is a device"),
    case("bogus-keras-backend", "inspect", K, message="not one bnkit runs on",
         KERAS_BACKEND="bogus"),
    case("decompression-bomb-image", "shift", K, "folder_bomb", message="not readable images"),
    case("image-size-too-big", "shift", K, "good.npz", "--image-size", "100000",
         message="more than half of this machine's memory"),
    case("input-shape-too-big", "check", S, "--input-shape", "3,100000,100000",
         message="more than half of this machine's memory"),
    case("huge-label-keras", "compare", K, "hugelabel.npz", "--val", "good.npz",
         message="the labels reach 1000000000 but hold only 4 classes"),
    case("huge-label-torch", "compare", S, "hugelabel_nchw.npz", "--val", "nchw.npz",
         message="the labels reach 1000000000 but hold only 4 classes"),
    case("half-precision-export", "export", "nets.py:half", "-o", "h.pt2", "--input-shape",
         "3,6,6", message="torch.float16"),
    # --- exit codes and messages (issue 24)
    case("factory-sys-exit-0", "inspect", "nets.py:exits0", message="SystemExit"),
    case("sys-exit-3-at-import", "inspect", "exits.py:build", message="SystemExit"),
    case("newline-in-name", "inspect", "a\nb.keras", message="a\\nb.keras"),
    case("warning-then-error", "adapt", K, "good.npz", "-o", "out.keras", "--scale", "1e38",
         message="after the warning: RuntimeWarning"),
    # --- the rest of the sweep (issue 25)
    case("val-classes-not-in-training", "compare", K, "folder_ab", "--val", "folder_bc",
         message="class folders 'c' are not among the training classes"),
    case("config-json-inflates", "inspect", "bomb.keras", message="config.json inflates to"),
    case("npz-bomb", "shift", K, "bomb.npz", message="a decompression bomb"),
    case("weights-bomb", "inspect", S, "--weights", "bomb.pt", message="a decompression bomb"),
    case("world-size-not-a-number", "adapt", S, "nchw.npz", "-o", "o.pt",
         message="is not a number of processes", WORLD_SIZE="abc"),
    case("world-size-without-rank", "adapt", S, "nchw.npz", "-o", "o.pt",
         message="RANK, MASTER_ADDR, MASTER_PORT not set", WORLD_SIZE="2"),
    case("ray-unreachable", "compare", K, "good.npz", "--val", "good.npz", "--executor",
         "ray", "--address", "127.0.0.1:1", message="cannot reach Ray at 127.0.0.1:1"),
    case("weights-integer-keys", "inspect", S, "--weights", "intkeys.pt",
         message="a key 0 of type int"),
    case("weights-sparse", "inspect", S, "--weights", "sparse.pt", message="torch.sparse_coo"),
    case("weights-meta", "inspect", S, "--weights", "meta.pt", message="meta device"),
    case("preprocess-torch-on-rgba", "shift", K, "rgba.npz", "--preprocess", "torch",
         message="3-channel RGB"),
    case("preprocess-caffe-on-2-channels", "shift", K, "twochannel.npz", "--preprocess",
         "caffe", message="3-channel RGB"),
    case("output-under-a-file", "freeze", K, "-o", "afile/out.keras", "--bn", "frozen",
         message="is a file, not a folder"),
    # --- PyTorch model specs (issue 18)
    case("factory-raises", "inspect", "nets.py:raises", message="the factory raised ValueError"),
    case("factory-returns-int", "inspect", "nets.py:not_a_module",
         message="returned int, not a torch.nn.Module"),
    case("factory-missing", "inspect", "nets.py:buld", message="has no factory 'buld'"),
    case("spec-file-missing", "inspect", "missing.py:build", message="no such file"),
    case("spec-not-identifier", "inspect", "nets.py:1x", message="not a model spec"),
    case("args-not-json", "inspect", S, "--args", "{classes: 3}", message="not valid JSON"),
    case("args-not-object", "inspect", S, "--args", "[3]", message="must be a JSON object"),
    case("args-wrong-name", "inspect", S, "--args", '{"klasses": 3}', message="factory raised"),
    case("args-on-keras", "inspect", K, "--args", '{"a": 1}', message="PyTorch model specs"),
    case("weights-on-keras", "inspect", K, "--weights", "good.pt", message="PyTorch model specs"),
    case("weights-folder", "inspect", S, "--weights", "weights_dir", message="is a directory"),
    case("weights-missing", "inspect", S, "--weights", "nothing.pt", message="no such file"),
    case("weights-empty", "inspect", S, "--weights", "empty.pt", message="is empty"),
    case("weights-text", "inspect", S, "--weights", "notes.pt", message="not a weights file"),
    case("weights-pickled-module", "inspect", S, "--weights", "module.pt",
         message="pickled Python objects"),
    case("weights-malicious-pickle", "inspect", S, "--weights", "evil.pt",
         message="pickled Python objects"),
    case("weights-wrong-keys", "inspect", S, "--weights", "wrongkeys.pt",
         message="do not fit"),
    case("weights-wrong-shapes", "inspect", S, "--weights", "wrongshape.pt",
         message="head.weight is (5, 4), the model's (3, 4)"),
    case("weights-as-output", "freeze", S, "--weights", "good.pt", "-o", "good.pt", "--bn",
         "frozen", message="never overwrites"),
    case("torch-output-suffix", "freeze", S, "-o", "out.keras", "--bn", "frozen",
         message="must end in '.pt'"),
    case("unknown-torchvision-model", "inspect", "torchvision:resnet19",
         message="torchvision has no model 'resnet19'"),
    case("unknown-timm-model", "inspect", "timm:resnet19", message="timm has no model"),
    case("spec-without-bn-adapt", "adapt", "nets.py:nobn", "nchw.npz", "-o", "o.pt",
         message="no BatchNormalization layer"),
    case("spec-unknown-train-from", "freeze", S, "-o", "out.pt", "--train-from", "hed",
         message="no layer named 'hed'"),
    case("spec-wrong-layout", "shift", S, "good.npz", message="channels"),
    case("spec-export-savedmodel", "export", S, "-o", "sm", "--format", "savedmodel",
         "--input-shape", "3,6,6", message="unknown export format 'savedmodel'"),
    # --- tta, compare, check and export options
    case("tta-lr-nan", "tta", K, "good.npz", "--lr", "nan", message="learning rate"),
    case("tta-batch-below-minimum", "tta", S, "nchw.npz", "--method", "tent", "--batch-size",
         "4", message="at least 16 (got 4)"),
    case("tta-all-batches-too-small", "tta", S, "small.npz", "--method", "tent",
         "--batch-size", "16", "-o", "t.pt", message="TENT adapted on no batch"),
    case("tta-bad-report-suffix", "tta", K, "good.npz", "--report", "r.txt",
         message="must end in '.json'"),
    case("compare-address-without-ray", "compare", K, "good.npz", "--val", "good.npz",
         "--address", "127.0.0.1:1", message="--address names a Ray cluster"),
    case("compare-out-users-folder", "compare", K, "good.npz", "--val", "good.npz", "-o",
         "results", message="did not write"),
    case("compare-unknown-strategy", "compare", K, "good.npz", "--val", "good.npz",
         "--strategies", "frozen,melt", message="unknown BN mode 'melt'"),
    case("compare-no-labels", "compare", K, "zeros.npz", "--val", "good.npz",
         message="has no labels"),
    case("compare-same-run-by-construction", "compare", K, "good.npz", "--val", "good.npz",
         "--train-from", "head", message="same run by construction"),
    case("check-val-missing", "check", S, "--val", "nothing.npz",
         message="no such file"),
    case("check-bad-select", "check", K, "--select", "re:[", message="invalid regular"),
    case("check-bad-input-shape", "check", S, "--input-shape", "3,x", message="--input-shape"),
    case("export-check-folder-without-classes", "export", K, "-o", "d.keras", "--val",
         "noclasses", message="no class folders"),
    case("export-output-loop", "export", K, "-o", "loop/d.keras", message="cannot resolve"),
    case("data-nan", "adapt", K, "nan.npz", "-o", "out.keras", message="NaN or inf"),
    case("data-strings", "shift", K, "strings.npz", message="not numbers"),
    case("data-label-mismatch", "compare", K, "mismatch.npz", "--val", "good.npz",
         message="'y' has 5"),
    case("rule-bad-regex", "freeze", K, "-o", "out.keras", "--rule", "re:[=frozen",
         message="invalid regular expression"),
    case("legacy-h5", "inspect", "legacy.h5", message="legacy HDF5"),
    case("zip-without-config", "inspect", "noconfig.keras", message="without config.json"),
]  # fmt: skip


def _run(ws: Path, args: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "bnkit.cli", *args],
        cwd=ws,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile_input_gets_one_line_exit_2_and_changes_nothing(ws, c):
    before = _snapshot(ws)
    proc = _run(ws, c.args, c.env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("bnkit: error:"), proc.stderr[-3000:]
    assert c.message in lines[0], lines[0]
    assert _snapshot(ws) == before
    assert not (ws / "pwned").exists()


def test_a_rendezvous_without_peers_says_how_long_it_waits_then_times_out(ws):
    """One line while it waits (how long, and the variable that sets it: a user who
    started one rank by mistake knows what is happening), one line when it gives up."""
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "BNKIT_RENDEZVOUS_TIMEOUT": "3"}  # fmt: skip
    before = _snapshot(ws)
    proc = _run(ws, ("adapt", S, "nchw.npz", "-o", "o.pt"), env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr[-3000:]
    assert "rank 0 of 2: waiting up to 3 s" in lines[0]
    assert "BNKIT_RENDEZVOUS_TIMEOUT" in lines[0]
    assert "did not all join" in lines[1] and "within 3 s" in lines[1]
    assert _snapshot(ws) == before


def test_sigterm_during_a_rendezvous_ends_the_process(ws):
    import signal
    import time

    env = {**{k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"},
           "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnkit.cli", "adapt", S, "nchw.npz", "-o", "o.pt"],
        cwd=ws,
        env=env,
        stderr=subprocess.PIPE,
    )
    port = int(env["MASTER_PORT"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # rank 0 listens once it waits for its peer
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (-signal.SIGTERM, 143)
    assert not (ws / "o.pt").exists()


def test_sigterm_while_a_factory_runs_exits_143_not_a_factory_error(ws, tmp_path):
    """A signal is not the factory's fault: exit 143, not 'the factory raised SystemExit'."""
    import signal
    import time

    shutil.copy(ws / "nets.py", tmp_path / "nets.py")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnkit.cli", "inspect", "nets.py:sleeper"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "factory-started").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert "factory raised" not in proc.stderr.read()


@pytest.mark.parametrize("flag", ["+a", "+i"])
def test_append_only_and_immutable_folders_leave_nothing_behind(ws, tmp_path, flag):
    folder = tmp_path / "locked"
    folder.mkdir()
    if subprocess.run(["chattr", flag, str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr is not available on this file system")
    try:
        proc = _run(ws, ("freeze", K, "-o", str(folder / "o.keras"), "--bn", "frozen"), {})
        listing = os.listdir(folder)
    finally:
        subprocess.run(["chattr", flag.replace("+", "-"), str(folder)], check=True)
    kind = "append-only" if flag == "+a" else "immutable"
    assert proc.returncode == 2 and f"the folder is {kind}" in proc.stderr, proc.stderr
    assert listing == []


def test_an_immutable_existing_output_is_refused_before_the_work(ws, tmp_path):
    out = tmp_path / "o.keras"
    shutil.copy(ws / K, out)
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr is not available on this file system")
    try:
        proc = _run(ws, ("freeze", K, "-o", str(out), "--bn", "frozen", "--overwrite"), {})
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    assert proc.returncode == 2 and "is immutable" in proc.stderr
    assert "keras" not in proc.stderr.split("immutable")[0].split(":")[-1]  # before any load


def test_a_full_disk_names_the_output(ws, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        proc = _run(ws, ("freeze", K, "-o", str(mount / "o.keras"), "--bn", "frozen"), {})
        listing = os.listdir(mount)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(mount / "o.keras") in lines[0] and "No space left on device" in lines[0]
    assert listing == []


def test_rules_selectors_and_options_are_refused_before_any_framework_starts(ws):
    bad = [
        ["freeze", K, "-o", "o.keras", "--rule", "re:[=frozen"],
        ["freeze", K, "-o", "o.keras", "--rule", "glob:*=melt"],
        ["check", K, "--select", "re:("],
        ["adapt", K, "good.npz", "-o", "o.keras", "--scale", "x"],
        ["adapt", K, "good.npz", "-o", "o.keras", "--preprocess", "resnet_v9"],
        ["adapt", K, "missing.npz", "-o", "o.keras"],
        ["adapt", K, "good.npz", "-o", "missing/o.keras"],
        ["shift", K, "noclasses"],
        ["compare", K, "good.npz", "--val", "good.npz", "--strategies", "melt"],
        ["compare", S, "nchw.npz", "--val", "nchw.npz", "--executor", "ray", "--address", "x"],
        ["check", S, "--input-shape", "0,3"],
        ["inspect", S, "--weights", "weights_dir"],
        ["inspect", S, "--args", "[1]"],
        ["adapt", S, "nchw.npz", "-o", "o.pt"],  # with WORLD_SIZE=abc
    ]
    code = (
        "import sys\nfrom bnkit.cli import main\nsys.argv = ['bnkit', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "loaded = [m for m in ('keras', 'torch', 'tensorflow', 'jax') if m in sys.modules]\n"
        "print(code, loaded)\n"
    )
    for args in bad:
        env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
        env["WORLD_SIZE"] = "abc" if args[-1] == "o.pt" else "1"
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=ws, env=env, capture_output=True, text=True
        )
        assert proc.stdout.split("\n")[0] == "2 []", (args, proc.stdout, proc.stderr)


def test_non_ascii_names_under_an_ascii_terminal_are_escaped_not_a_traceback(ws, tmp_path):
    """PYTHONIOENCODING=ascii (or LANG=C where Python falls back to ASCII): a file named
    'modèle é.keras' is read and 'sortie ü.keras' written; the lines printed escape what
    ASCII lacks."""
    src = tmp_path / "modèle é.keras"
    shutil.copy(ws / "model.keras", src)
    out = tmp_path / "sortie ü.keras"
    proc = _run(ws, ("freeze", str(src), "-o", str(out), "--bn", "frozen"),
                {"PYTHONIOENCODING": "ascii"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and out.exists()
    assert "wrote " in proc.stdout and "sortie \\xfc.keras" in proc.stdout
