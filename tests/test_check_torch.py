"""`check` on PyTorch modules: each finding's behaviour is made to happen in real torch
(statistics that move, an error raised, outputs that differ) before the finding is
asserted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch_nets import batch, moved, net, state, train_steps

import bnkit

SHAPE = (3, 6, 6)


def codes(model: nn.Module, **kwargs) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in bnkit.check(model, **kwargs).findings:
        found.setdefault(f.code, set()).add(f.path)
    return found


def test_a_clean_module_has_no_error_and_check_changes_nothing():
    model = net()
    before = state(model)
    report = bnkit.check(model, input_shape=SHAPE, batch_size=32)
    assert not report.errors and model.training
    assert all(np.array_equal(v, state(model)[k]) for k, v in before.items())


def test_bn010_eval_undone_by_model_train():
    model = net()
    model.stem[1].eval()
    assert "stem.1" in codes(model)["BN010"]
    before = state(model.stem[1])
    train_steps(model)  # the loop's model.train() puts it back in training mode
    assert moved(before, state(model.stem[1]), "running_mean")


def test_bn011_requires_grad_false_still_moves_the_statistics():
    model = net()
    for p in model.block[1].parameters():
        p.requires_grad_(False)
    assert "block.1" in codes(model)["BN011"]
    before = state(model.block[1])
    train_steps(model)
    after = state(model.block[1])
    assert moved(before, after, "running_var") and not moved(before, after, "weight")


def test_bn012_no_running_statistics_makes_one_image_differ_from_the_batch():
    model = net()
    model.stem[1] = nn.BatchNorm2d(4, track_running_stats=False)
    assert codes(model)["BN012"] == {"stem.1"}
    model.eval()
    x, _ = batch(1)
    with torch.no_grad():
        assert not torch.allclose(model(x[:1]), model(x)[:1], atol=1e-4)


def test_bn013_lightning_freeze_trains_on_batch_stats_and_infers_on_stored_ones():
    from lightning.pytorch.callbacks import BaseFinetuning

    model = net()
    BaseFinetuning.freeze(model, train_bn=False)  # what Lightning's finetuning does to BN
    assert codes(model)["BN013"] == {"stem.1", "block.1"}
    modes = {r.bn_mode for r in bnkit.inspect(model).bn_layers}
    assert modes == {"custom"}  # batch statistics, no update: none of the four modes
    before = state(model)
    x, _ = batch(2)
    with torch.no_grad():
        model.train()
        in_training = model(x)
        model.eval()
        in_inference = model(x)
    assert not torch.allclose(in_training, in_inference, atol=1e-4)
    assert not moved(before, state(model), "stem.1.running_mean")


def test_bn014_cumulative_average_lets_late_batches_count_little():
    bn = nn.BatchNorm1d(1, momentum=None)
    assert codes(nn.Sequential(nn.Linear(1, 1), bn))["BN014"] == {"1"}
    bn.train()
    for _ in range(9):
        bn(torch.zeros(16, 1))
    bn(torch.full((16, 1), 10.0) + torch.randn(16, 1))  # the last batch, far away
    assert float(bn.running_mean) < 1.5  # an exponential average (0.1) would give about 1


def test_bn015_sync_batchnorm_is_plain_bn_alone_and_raises_in_a_cpu_group(tmp_path):
    import torch.distributed as dist

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)).train()
    plain = nn.BatchNorm2d(4).train()
    assert codes(model)["BN015"] == {"1"}
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        features = model[0](x)
        assert torch.allclose(model[1](features), plain(features))  # nothing synchronised
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        assert codes(model)["BN015"] == {"1"}
        with pytest.raises(ValueError, match="GPU"):
            model(x)
    finally:
        dist.destroy_process_group()


def test_bn004_one_value_per_channel_raises_in_training():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    report = bnkit.check(model, batch_size=1, input_shape=(4,))
    assert [f.severity for f in report.findings if f.code == "BN004"] == ["error"]
    model.train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.randn(1, 4))


def test_bn003_small_momentum_keeps_old_statistics():
    model = net()
    model.stem[1].momentum = 0.001  # PyTorch's momentum is the weight of the new batch
    assert "stem.1" in codes(model, steps=50)["BN003"]
    before = state(model.stem[1])
    train_steps(model, steps=3)
    after = state(model.stem[1])
    assert np.abs(after["running_var"] - before["running_var"]).max() < 0.05


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) + self.bn(self.conv(x) + 10.0)


def test_bn006_a_bn_called_twice_averages_both_call_sites():
    model = Twice()
    assert codes(model, input_shape=SHAPE)["BN006"] == {"bn"}
    model.train()
    for _ in range(50):
        model(torch.randn(8, 3, 6, 6))
    mean = model.bn.running_mean
    assert 2.0 < float(mean.mean()) < 8.0  # neither site's mean (0, about 10)


def test_bn005_non_finite_variance_gives_nan_outputs():
    model = net()
    with torch.no_grad():
        model.block[1].running_var[0] = float("nan")
    assert "block.1" in codes(model)["BN005"]
    model.eval()
    with torch.no_grad():
        assert torch.isnan(model(batch(0)[0])).all()


def test_bn007_a_name_pattern_that_froze_only_some_bn_of_a_block():
    block = nn.Sequential()
    block.add_module("conv1", nn.Conv2d(3, 4, 3))
    block.add_module("bn1", nn.BatchNorm2d(4))
    block.add_module("conv2", nn.Conv2d(4, 4, 1))
    block.add_module("norm2", nn.BatchNorm2d(4))  # the pattern below misses this one
    model = nn.Sequential(block)
    for name, module in model.named_modules():
        if name.endswith("bn1"):
            module.requires_grad_(False)
    assert codes(model)["BN007"] == {"0"}
    before = state(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(torch.randn(4, 3, 6, 6)).square().mean().backward()
    opt.step()
    after = state(model)
    assert not moved(before, after, "0.bn1.weight") and moved(before, after, "0.norm2.weight")
    assert moved(before, after, "0.bn1.running_mean")  # and its statistics move anyway


def test_bn009_convnext_has_no_bn():
    import torchvision

    model = torchvision.models.convnext_tiny(weights=None)
    report = bnkit.check(model)
    assert [f.code for f in report.findings] == ["BN009"]
    assert "LayerNorm" in report.findings[0].problem


def test_bn016_a_bn_no_inference_pass_calls_is_named_and_left_alone():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, init_weights=True)
    report = bnkit.check(model, input_shape=(3, 64, 64))
    found = [f.path for f in report.findings if f.code == "BN016"]
    assert found == ["aux1.conv.bn", "aux2.conv.bn"]
    # it is really off the path: inference leaves its statistics; training moves them
    aux = model.aux1.conv.bn
    before = aux.running_mean.clone()
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, aux.running_mean)
    model.train()
    model(torch.randn(2, 3, 224, 224))
    assert not torch.equal(before, aux.running_mean)


def test_qat_fused_conv_bn_statistics_are_found_updating_until_frozen():
    """BN018: after prepare_qat, a fused ConvBnReLU2d's statistics move at every training
    step; after freeze_bn_stats they stay through model.train(), and check says nothing
    (not BN010: the fused module's train() leaves its frozen BN in eval)."""
    import torch.ao.quantization as q
    from torch.ao.nn.intrinsic import qat

    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 3)).train()  # fmt: skip
    m = q.fuse_modules_qat(m, [["0", "1", "2"]])
    m.qconfig = q.get_default_qat_qconfig("x86")
    q.prepare_qat(m, inplace=True)
    x = torch.randn(16, 3, 8, 8)
    before = m[0].bn.running_mean.clone()
    m(x)
    assert not torch.equal(before, m[0].bn.running_mean)  # the pitfall happens
    (finding,) = [f for f in bnkit.check(m, input_shape=(3, 8, 8)).findings]
    assert finding.code == "BN018" and finding.path == "0.bn" and "freeze_bn_stats" in finding.fix
    m.apply(qat.freeze_bn_stats)
    m.train()
    before = m[0].bn.running_mean.clone()
    m(x)
    assert torch.equal(before, m[0].bn.running_mean)  # frozen through model.train()
    assert bnkit.check(m, input_shape=(3, 8, 8)).findings == ()
    (record,) = [r for r in bnkit.backends.get_backend(m).records(m) if r.is_bn]
    assert record.bn_mode == "affine"


def _exported_source() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))  # fmt: skip


def _exported(mode: str):
    """A small CNN exported with torch.export in `mode`, batch size free (2 or more)."""
    m = _exported_source()
    getattr(m, mode)()
    batch = torch.export.Dim("batch", min=2)
    return torch.export.export(m, (torch.randn(4, 3, 8, 8),), dynamic_shapes=({0: batch},))


def test_an_exported_graph_in_training_mode_is_found_bn019():
    """BN019: exported in training mode, the graph normalises with the batch's statistics
    at inference too (and cannot be switched: its eval() raises); found on the program
    and on its module, not on the same model exported in eval()."""
    program = _exported("train")
    x = torch.randn(6, 3, 8, 8)
    graph = program.module()
    with torch.no_grad():  # the pitfall happens: two images alone differ from in a batch
        assert not torch.allclose(graph(x)[:2], graph(x[:2]), atol=1e-4)
    with pytest.raises(NotImplementedError):
        graph.eval()
    for model in (program, graph):
        (finding,) = bnkit.check(model).findings
        assert (finding.code, finding.severity, finding.path) == ("BN019", "error", "1")
        assert "model.eval()" in finding.fix and "bnkit.fold" in finding.fix
    (bn,) = [r for r in bnkit.inspect(program).layers if r.is_bn]
    assert bn.path == "1" and bn.bn_mode == "train"
    fixed = _exported("eval")
    with torch.no_grad():
        assert torch.allclose(fixed.module()(x)[:2], fixed.module()(x[:2]), atol=1e-5)
    assert bnkit.check(fixed, input_shape=(3, 8, 8)).findings == ()
    assert [r.bn_mode for r in bnkit.inspect(fixed).layers if r.is_bn] == ["affine"]


@pytest.mark.parametrize("operation", ["freeze", "tta", "compare"])
def test_an_exported_graph_is_refused_in_one_line_by_what_would_change_it(operation):
    program = _exported("eval")
    x = np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype("float32")
    y = np.arange(8) % 3
    run = {
        "freeze": lambda m: bnkit.freeze(m, bn="frozen"),
        "tta": lambda m: bnkit.tta(m, x, "tent", batch_size=4, min_batch_size=2),
        "compare": lambda m: bnkit.compare(m, (x, y), (x, y), ["frozen"], epochs=1),
    }[operation]
    graph = program.module()
    before = {k: v.clone() for k, v in graph.state_dict().items()}
    with pytest.raises(bnkit.BnkitError, match=r"torch\.export") as err:
        run(graph)
    assert len(str(err.value).splitlines()) == 1
    assert all(torch.equal(v, graph.state_dict()[k]) for k, v in before.items())
    with pytest.raises(bnkit.BackendError, match=r"ExportedProgram: bnkit\.check and"):
        run(program)


def test_adapt_reestimates_the_bn_operators_of_an_exported_graph():
    """A graph has no BN module to patch: adapt runs it node by node, and the statistics
    it writes are those adapt gives the module the graph was exported from."""
    program = _exported("eval")
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(20, 3, 8, 8)).astype("float32")
    graph = program.module()
    report = bnkit.adapt(graph, x, batch_size=8)  # batches of 8, 8 and 4
    assert report.samples == 20 and [layer.path for layer in report.layers] == ["1"]
    module = _exported_source()
    bnkit.adapt(module, x, batch_size=20)
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(
            graph.get_buffer(f"1.{name}").numpy(), getattr(module[1], name).numpy(), rtol=1e-5
        )
    with torch.no_grad():
        np.testing.assert_allclose(
            graph(torch.as_tensor(x[:8])).numpy(),
            module.eval()(torch.as_tensor(x[:8])).numpy(),
            rtol=1e-4,
            atol=1e-5,
        )
    with pytest.raises(bnkit.BackendError, match=r"ExportedProgram: bnkit\.check and"):
        bnkit.adapt(program, x)


@pytest.mark.parametrize("batch", ["fixed", "dynamic"])
def test_fold_folds_the_bn_operators_of_an_exported_graph(batch, tmp_path):
    """pytorch 141116: BN folded inside a torch.export graph. Each aten.batch_norm that a
    convolution or linear operator alone feeds goes into its weight and bias; a BN after
    a ReLU stays as exported; the result computes the same and exports again. A graph
    exported in training mode has nothing fixed to fold (BN019)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                      nn.ReLU(), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 4), nn.BatchNorm1d(4)).train()  # fmt: skip
    for _ in range(5):  # statistics and weights away from their initial values
        m(torch.randn(16, 3, 8, 8) * 2 + 1)
    m.eval()
    x = torch.randn(4, 3, 8, 8) * 2 + 1
    dynamic = ({0: torch.export.Dim("batch", min=2)},) if batch == "dynamic" else None
    program = torch.export.export(m, (x,), dynamic_shapes=dynamic)
    result = bnkit.fold(program)
    assert result.folded == ("1", "9") and [path for path, _ in result.kept] == ["5"]
    assert result.max_diff_original < 1e-5 and result.max_diff_single < 1e-5
    ops = [str(n.target) for n in result.model.graph.nodes if n.op == "call_function"]
    assert sum("batch_norm" in op for op in ops) == 1
    with torch.no_grad():
        assert torch.allclose(result.model(x), m(x), atol=1e-5)
        again = torch.export.export(result.model, (x,)).module()
        assert torch.allclose(again(x), m(x), atol=1e-5)
    assert all(torch.equal(v, program.state_dict[k]) for k, v in m.state_dict().items())
    with pytest.raises(bnkit.BnkitError, match="exported in training mode"):
        bnkit.fold(_exported("train"))
    with pytest.raises(bnkit.BnkitError, match="bnkit export writes modules"):
        bnkit.export(program, tmp_path / "m.pt2")  # its batch may be fixed: yours to export
    assert list(tmp_path.iterdir()) == []


def test_an_fx_prepared_qat_graph_is_read_like_eager_qat():
    """`prepare_qat_fx` (FX graph mode QAT) fuses Conv+BN into the same QAT modules as the
    eager recipe: check finds their statistics updating (BN018) until `freeze_bn_stats`,
    and adapt re-estimates them, changing nothing else (the observers held)."""
    import warnings

    from torch.ao.nn.intrinsic import qat
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    x = torch.randn(8, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = prepare_qat_fx(net().train(), get_default_qat_qconfig_mapping("x86"), (x,))
    found = bnkit.check(graph, input_shape=(3, 6, 6)).findings
    assert {(f.code, f.path) for f in found} == {("BN018", "stem.0.bn"), ("BN018", "block.0.bn")}
    graph.apply(qat.freeze_bn_stats)
    assert bnkit.check(graph, input_shape=(3, 6, 6)).findings == ()
    before = {k: v.clone() for k, v in graph.state_dict().items()}
    bnkit.adapt(graph, x.numpy() * 2 + 1)
    changed = {k for k, v in graph.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {
        f"{p}.running_{s}" for p in ("stem.0.bn", "block.0.bn") for s in ("mean", "var")
    }


def test_an_exported_graph_without_bn_is_checked_and_refused_like_one_with_bn():
    program = torch.export.export(nn.Sequential(nn.Linear(4, 3)).eval(), (torch.randn(2, 4),))
    assert [f.code for f in bnkit.check(program, input_shape=(4,)).findings] == ["BN009"]
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    with pytest.raises(bnkit.BnkitError, match=r"torch\.export"):
        bnkit.tta(program.module(), x, "tent", batch_size=4, min_batch_size=2)


def test_bn021_weights_loaded_without_the_bn_buffers():
    """A checkpoint that lacks the BN buffers (or a loader that resets them after loading,
    as transformers' _init_weights did for timm models, PR 43520): the statistics never
    saw data while gamma/beta were trained."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    trained = torchvision.models.resnet18(weights=None, num_classes=4)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    x = torch.randn(8, 3, 32, 32)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(trained(x), torch.arange(8) % 4).backward()
        opt.step()
    assert "BN021" not in {f.code for f in bnkit.check(trained).findings}
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    weights = {k: v for k, v in trained.state_dict().items() if not k.endswith(buffers)}
    loaded = torchvision.models.resnet18(weights=None, num_classes=4)
    loaded.load_state_dict(weights, strict=False)
    assert sum(f.code == "BN021" for f in bnkit.check(loaded).findings) == 20
    bnkit.adapt(loaded, x.numpy())
    assert "BN021" not in {f.code for f in bnkit.check(loaded).findings}


def test_tta_without_adaptation_runs_an_exported_graph_as_exported():
    """`tta(..., "none")` predicts with the model as it stands: a graph runs as exported
    (its eval() raises), the methods that change it refuse it in one line."""
    graph = _exported("eval").module()
    x = np.random.default_rng(0).normal(size=(12, 3, 8, 8)).astype("float32")
    y = np.arange(12) % 3
    report = bnkit.tta(graph, (x, y), "none", batch_size=4)
    with torch.no_grad():
        want = (graph(torch.as_tensor(x)).argmax(1).numpy() == y).mean()
    assert report.accuracy == pytest.approx(want)
