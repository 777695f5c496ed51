"""Why `robust` is what it is (issue 22): the normalisations and corrections measured
before choosing, on the corruption benchmark's streams (PyTorch, the demo's CNN, batch
64, seed 0 by default).

- `online`: each batch predicted with the statistics of the stream so far, this batch
  included (OnlineAdapt, what `robust` normalises with), no correction;
- `rbn-memory`: RoTTA's robust BN on bnkit's moments: a category-balanced memory of 64
  samples (RoTTA's CSTU, pseudo-labels from the model), and after each batch every BN
  layer's statistics moved towards the memory's by alpha 0.05 from the source
  statistics; then the batch predicted;
- `rbn-memory-warm`: the same with alpha max(0.05, 1/k) at the k-th update (a running
  mean at first), for streams far shorter than RoTTA's;
- `tent-online`: TENT's entropy step on BN gamma/beta, normalising with the stream's
  statistics so far instead of the batch's, with `robust`'s correction;
- `robust-one-pass` (issue 34): `robust` in one forward pass per batch instead of two:
  each BN merges the batch's input moments into the stream's statistics as the
  activations reach it and normalises with the merge, so the layers after it see the
  activations normalised with the stream's statistics (`robust` measures each layer's
  moments with the layers before normalising with the batch's own, as `adapt` does,
  then predicts in a second pass);
- `robust-lagged`: the same pass, each batch normalised with the statistics of the
  stream before it (the first batch with its own), then merged;
- `first-layer-gate` (issue 34, do no harm): `robust` with each batch's statistics
  blended between the source's and the stream's by the first BN layer's shift;
- `mid-layer-gate`: the same blend by the mean shift of the middle BN layers (after the
  first, before the last third), which one class's images barely move;
- `source-prior`: the same blend by count, the source statistics worth 64 images;
- `entropy-select`: each batch predicted with both the source's and the stream's
  statistics, the source's kept while their mean entropy over the stream is lower;
- `robust-measure-all`, `-half`, `-quarter`, `-eighth`, `-quarter-every-2` (issue 34,
  about one pass): `robust` with the stream's statistics taking in all, half, a quarter
  (at least 16 images) or an eighth (at least 8) of each batch after the first 8, or a
  quarter of every other batch, each sample weighted as its whole batch and measured
  with it; `-quarter-pooled`: a quarter of each batch, the samples measured together
  once they fill a batch (`robust` does so with an eighth);
- `online-lame`: `robust`'s loop without its domains or sampling (the stream's statistics
  so far and LAME from the second label-shifted batch in a row), the baseline of the
  next four;
- `first-batch-mid-gate`, `first-2-batches-mid-gate` (issue 34, do no harm on young
  streams): `mid-layer-gate` on the first one or two batches only, then the stream's;
- `first-batch-split`: the first batch with the stream's statistics in the first two
  thirds of the BN layers and the source's in the last third;
- `first-batch-source`: the first batch with the source statistics;
- `source`: no adaptation;
- `robust`: `bnkit.tta(..., "robust")`.

    .venv/bin/python benchmarks/tta_variants.py [--seeds 1] [--corruptions fog,snow]
        [--streams iid,sorted,dirichlet] [--variants adapt,robust-one-pass,robust]
        [--severity 5] [--images 384] [--repeat 4]
"""

from __future__ import annotations

import argparse
import importlib

import numpy as np
import torch
from rotta_reference import CSTU
from torch.nn import functional as F
from tta_corruptions import BATCH, stream

import bnkit
from bnkit.backends import get_backend
from bnkit.corruptions import CORRUPTIONS, corrupted_digits
from bnkit.demo import kit
from bnkit.stats import Moments, OnlineAdapt, _layer_shift
from bnkit.tta import SHIFT_RUN, _label_shift, _mixture, _ramp, lame

tta_module = importlib.import_module("bnkit.tta")  # the module (bnkit.tta is the function)
ALPHA, MEMORY = 0.05, 64
VARIANTS = ("source", "adapt", "online", "rbn-memory", "rbn-memory-warm", "tent-online",
            "robust-one-pass", "robust-lagged", "first-layer-gate", "mid-layer-gate",
            "source-prior", "entropy-select", "robust-measure-all", "robust-measure-half",
            "robust-measure-quarter", "robust-measure-eighth", "robust-measure-quarter-every-2",
            "robust-measure-quarter-pooled", "online-lame", "first-batch-mid-gate",
            "first-2-batches-mid-gate", "first-batch-split", "first-batch-source",
            "robust")  # fmt: skip
MEASURED = {  # ROBUST_SHARE, ROBUST_MIN, ROBUST_EVERY, ROBUST_POOLED
    "robust-measure-all": (1.0, 16, 1, False),
    "robust-measure-half": (0.5, 16, 1, False),
    "robust-measure-quarter": (0.25, 16, 1, False),
    "robust-measure-eighth": (0.125, 8, 1, False),
    "robust-measure-quarter-every-2": (0.25, 16, 2, False),
    "robust-measure-quarter-pooled": (0.25, 16, 1, True),
}
GATE = (0.03, 0.1)
"""first-layer-gate: the first BN layer's shift (mean KL over channels, nats) below which
the source statistics are kept and above which the stream's are used, blended between."""
PRIOR = 64
"""source-prior: the source statistics count as this many images of the stream."""
MID_GATE = (0.005, 0.009)
"""mid-layer-gate: the mean shift (KL, nats) of the BN layers after the first and before
the last third below which the source statistics are kept, above which the stream's."""


def _mid_shift(streamed, source, paths) -> float:
    """The mean shift of the middle BN layers (after the first, before the last third),
    where one class's images barely move the statistics (clean digits: at most 0.006
    nats per layer) and the corruptions the source model gets wrong do (0.01 to 0.1)."""
    mid = paths[1 : max(2, (2 * len(paths)) // 3)]
    return float(np.mean([
        _layer_shift(p, 0, streamed[p], source[p]).kl_mean for p in mid
    ]))  # fmt: skip


BLENDS = {
    "first-layer-gate": lambda streamed, source, paths, images: _ramp(
        _layer_shift(paths[0], 0, streamed[paths[0]], source[paths[0]]).kl_mean, GATE
    ),
    "mid-layer-gate": lambda streamed, source, paths, images: _ramp(
        _mid_shift(streamed, source, paths), MID_GATE
    ),
    "source-prior": lambda streamed, source, paths, images: images / (images + PRIOR),
    "online-lame": lambda streamed, source, paths, images: 1.0,
    "first-batch-mid-gate": lambda streamed, source, paths, images: (
        1.0 if images > BATCH else _ramp(_mid_shift(streamed, source, paths), MID_GATE)
    ),
    "first-2-batches-mid-gate": lambda streamed, source, paths, images: (
        1.0 if images > 2 * BATCH else _ramp(_mid_shift(streamed, source, paths), MID_GATE)
    ),
    "first-batch-split": lambda streamed, source, paths, images: (
        1.0
        if images > BATCH
        else {p: float(i < (2 * len(paths)) // 3) for i, p in enumerate(paths)}
    ),
    "first-batch-source": lambda streamed, source, paths, images: float(images > BATCH),
}
"""The stream's share in the statistics each batch is predicted with, from the stream's
statistics so far, the source's, the BN paths and the images seen so far (this batch
included)."""


def entropy_select(model, x: np.ndarray, y: np.ndarray) -> float:
    """`robust` that predicts each batch twice, with the source statistics and with the
    stream's so far, and keeps the source's while their predictions' mean entropy over
    the stream so far is the lower (a do-no-harm candidate, issue 34)."""
    backend = get_backend(model)
    adapter = backend.test_time()
    source = backend.snapshot(model, False).stats
    online = OnlineAdapt(model)
    seen, in_a_row, shifted, hits = Moments(), 0, False, 0
    entropies: dict[str, list[float]] = {"source": [], "stream": []}
    for i in range(0, len(y), BATCH):
        xb = x[i : i + BATCH]
        online.update(xb)
        streamed = backend.snapshot(model, False).stats
        out = adapter.predict(model, xb)
        backend.set_bn_stats(model, source)
        from_source = adapter.predict(model, xb)
        backend.set_bn_stats(model, streamed)
        for key, o in (("source", from_source), ("stream", out)):
            p = softmax(o)
            entropies[key].append(float(-(p * np.log(p + 1e-12)).sum(1).mean()))
        in_a_row = in_a_row + 1 if _label_shift(out, seen) else 0
        shifted = shifted or in_a_row >= SHIFT_RUN
        seen.add(out.mean(0), out.var(0), len(out))
        if np.mean(entropies["source"]) < np.mean(entropies["stream"]):
            out = from_source
        hits += int(((lame(out) if shifted else out).argmax(1) == y[i : i + BATCH]).sum())
    return hits / len(y)


def blended(model, x: np.ndarray, y: np.ndarray, share) -> float:
    """`robust` with each batch's statistics blended between the source's and the stream's
    so far, the stream weighing `share(streamed, source, paths, images)`: do-no-harm
    candidates (issue 34).
    By the first BN layer's shift: on easy domains the first layer barely moves, and
    unlike the deeper layers' it hardly depends on which classes the stream has shown
    so far. By count: the source statistics as a prior worth PRIOR images (Schneider et
    al., NeurIPS 2020)."""
    backend = get_backend(model)
    adapter = backend.test_time()
    source = backend.snapshot(model, False).stats
    online = OnlineAdapt(model)
    paths = bn_paths(model)
    seen, in_a_row, shifted, hits = Moments(), 0, False, 0
    for i in range(0, len(y), BATCH):
        xb = x[i : i + BATCH]
        online.update(xb)
        streamed = backend.snapshot(model, False).stats
        shares = share(streamed, source, paths, i + len(xb))
        backend.set_bn_stats(model, _mixture(source, {p: streamed[p] for p in paths}, shares))
        out = adapter.predict(model, xb)
        backend.set_bn_stats(model, streamed)
        in_a_row = in_a_row + 1 if _label_shift(out, seen) else 0
        shifted = shifted or in_a_row >= SHIFT_RUN
        seen.add(out.mean(0), out.var(0), len(out))
        hits += int(((lame(out) if shifted else out).argmax(1) == y[i : i + BATCH]).sum())
    return hits / len(y)


WEIGHTS = {
    "robust-one-pass": lambda seen, n: n / (seen + n),
    "robust-lagged": lambda seen, n: 1.0 if seen == 0 else 0.0,
}
"""The one-pass variants: the batch's weight in the statistics it is normalised with, by
the images seen before it and its own: its share of the stream so far (the statistics
of the stream so far, itself included), or none after the first batch (the stream
before it)."""


def one_pass_robust(model, x: np.ndarray, y: np.ndarray, weight) -> float:
    """`robust`'s loop (label-shift test, LAME from the second shifted batch in a row) with
    each batch predicted in one forward pass: every BN merges the batch's input moments
    into the stream's statistics as the activations reach it (Chan's update, the batch
    weighing `weight(seen, n)`) and normalises with the merge; the merge with the batch's
    share is then kept as the stream's statistics."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    share = {"w": 1.0, "keep": 1.0}

    def patched(layer):
        def forward(h):
            var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=0)
            w, keep = share["w"], share["keep"]
            delta = mean - layer.running_mean
            norm_mean = layer.running_mean + w * delta
            norm_var = (1 - w) * layer.running_var + w * var + w * (1 - w) * delta**2
            captured[id(layer)] = (layer.running_mean + keep * delta,
                                   (1 - keep) * layer.running_var + keep * var
                                   + keep * (1 - keep) * delta**2)  # fmt: skip
            return F.batch_norm(h, norm_mean, norm_var, layer.weight, layer.bias, False, 0.0,
                                layer.eps)  # fmt: skip

        return forward

    for layer in layers:
        layer.forward = patched(layer)
    model.eval()
    seen_outputs, shifted, in_a_row, images, hits = Moments(), False, 0, 0, 0
    with torch.no_grad():
        for i in range(0, len(y), BATCH):
            xb = torch.as_tensor(x[i : i + BATCH])
            n = len(xb)
            share["w"], share["keep"] = weight(images, n), n / (images + n)
            out = model(xb).numpy()
            for layer in layers:
                layer.running_mean.copy_(captured[id(layer)][0])
                layer.running_var.copy_(captured[id(layer)][1])
            images += n
            if not shifted:
                in_a_row = in_a_row + 1 if _label_shift(out, seen_outputs) else 0
                shifted = in_a_row >= SHIFT_RUN
            seen_outputs.add(out.mean(0), out.var(0), len(out))
            hits += int(((lame(out) if shifted else out).argmax(1) == y[i : i + BATCH]).sum())
    return hits / len(y)


def softmax(o: np.ndarray) -> np.ndarray:
    e = np.exp(o - o.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def bn_paths(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]


def run(variant: str, model, x: np.ndarray, y: np.ndarray) -> float:
    backend = get_backend(model)
    adapter = backend.test_time()
    if variant == "robust":
        return float(bnkit.tta(model, (x, y), "robust", batch_size=BATCH).accuracy)
    if variant in MEASURED:
        names = ("ROBUST_SHARE", "ROBUST_MIN", "ROBUST_EVERY", "ROBUST_POOLED")
        kept = [getattr(tta_module, n) for n in names]
        for name, value in zip(names, MEASURED[variant], strict=True):
            setattr(tta_module, name, value)
        try:
            return float(bnkit.tta(model, (x, y), "robust", batch_size=BATCH).accuracy)
        finally:
            for name, value in zip(names, kept, strict=True):
                setattr(tta_module, name, value)
    if variant in WEIGHTS:
        return one_pass_robust(model, x, y, WEIGHTS[variant])
    if variant in ("adapt", "source"):
        method = "none" if variant == "source" else "adapt"
        return float(bnkit.tta(model, (x, y), method, batch_size=BATCH).accuracy)
    if variant in BLENDS:
        return blended(model, x, y, BLENDS[variant])
    if variant == "entropy-select":
        return entropy_select(model, x, y)
    hits = 0
    if variant == "online":
        online = OnlineAdapt(model)
        for i in range(0, len(y), BATCH):
            online.update(x[i : i + BATCH])
            hits += int(
                (adapter.predict(model, x[i : i + BATCH]).argmax(1) == y[i : i + BATCH]).sum()
            )
        return hits / len(y)
    if variant.startswith("rbn-memory"):
        paths = bn_paths(model)
        modules = dict(model.named_modules())
        memory = CSTU(MEMORY, 10)  # RoTTA's own, from the reference
        for k, i in enumerate(range(0, len(y), BATCH), start=1):
            xb = x[i : i + BATCH]
            p = softmax(adapter.predict(model, xb))
            entropy = -(p * np.log(p + 1e-6)).sum(1)
            for j in range(len(xb)):
                memory.add(xb[j], int(p[j].argmax()), float(entropy[j]))
            a = max(ALPHA, 1 / k) if variant.endswith("warm") else ALPHA
            with backend.moments_pass(model, paths, normalize="running") as moments:
                got = moments(np.stack(memory.memory()[0]))
            new = {}
            for path in paths:
                bn = modules[path]
                mean, var = bn.running_mean.numpy(), bn.running_var.numpy()
                new[path] = {"mean": (1 - a) * mean + a * got[path][0],
                             "var": (1 - a) * var + a * got[path][1]}  # fmt: skip
            backend.set_bn_stats(model, new)
            hits += int((adapter.predict(model, xb).argmax(1) == y[i : i + BATCH]).sum())
        return hits / len(y)
    if variant == "tent-online":
        online = OnlineAdapt(model)
        params = [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                  for p in m.parameters()]  # fmt: skip
        trained = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
        seen, shifted, run_ = Moments(), False, 0
        for i in range(0, len(y), BATCH):
            xb = x[i : i + BATCH]
            online.update(xb)
            model.eval()  # BN normalises with the stream's statistics; gamma/beta learn
            out = model(torch.as_tensor(xb))
            loss = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            o = out.detach().numpy()
            run_ = run_ + 1 if _label_shift(o, seen) else 0
            shifted = shifted or run_ >= 2
            seen.add(o.mean(0), o.var(0), len(o))
            hits += int(((lame(o) if shifted else o).argmax(1) == y[i : i + BATCH]).sum())
        return hits / len(y)
    raise ValueError(variant)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    parser.add_argument("--streams", default="iid,sorted,dirichlet")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--images", type=int, default=None, help="the first N of each stream")
    parser.add_argument(
        "--repeat", type=int, default=1, help="each corruption's images N times (longer streams)"
    )
    args = parser.parse_args()
    names = [c for c in args.corruptions.split(",") if c]
    variants = [v for v in args.variants.split(",") if v]
    k = kit("torch")
    from bnkit.pretrain import pretrained_digits

    net = pretrained_digits(framework="torch")
    print(f"{k.version()}; {len(names)} corruptions at severity {args.severity}, batch "
          f"{BATCH}, {args.seeds} seed(s)"
          + (f", the first {args.images} images of each stream" if args.images else "")
          + (f", each corruption's images {args.repeat} times over" if args.repeat > 1 else "")
          + "; mean accuracy over the corruptions (misses: corruptions where the variant "
          "is more than 1 point below the better of source and adapt)")  # fmt: skip
    print("stream".ljust(12) + "".join(f"{v:>21}" for v in variants))
    sets = {c: corrupted_digits(c, args.severity) for c in names}
    sets = {c: (np.concatenate([x] * args.repeat), np.concatenate([y] * args.repeat))
            for c, (x, y) in sets.items()}  # fmt: skip
    cut = slice(None, args.images)
    for kind in args.streams.split(","):
        per = {v: [] for v in variants}  # mean over seeds, per corruption
        for c in names:
            for variant in variants:
                accs = [run(variant, k.clone(net.model), k.images(xs[cut]), ys[cut])
                        for s in range(args.seeds)
                        for xs, ys in [stream(*sets[c], s, kind)]]  # fmt: skip
                per[variant].append(float(np.mean(accs)))
        cells = []
        for variant in variants:
            cell = f"{np.mean(per[variant]):.1%}"
            if "source" in per and "adapt" in per:
                best = np.maximum(per["source"], per["adapt"])
                cell += f" ({int((np.array(per[variant]) < best - 0.01).sum())} misses)"
            cells.append(f"{cell:>21}")
        print(kind.ljust(12) + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
