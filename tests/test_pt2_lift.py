"""lift_exported_program: an uploaded torch.export program (.pt2) back into real nn.Conv/nn.Linear/nn.BatchNorm
modules, so that it trains and torch-pruning prunes it (issue 14). Programs are saved and reloaded, as an
upload is, in both forms users save: as exported (training IR) and after run_decompositions (core aten)."""

from __future__ import annotations

import copy

import pytest

from core.errors import PassError
from worker.pt2_lift import _reshape_plan, lift_exported_program, module_names

torch = pytest.importorskip("torch")

LIFTED_TARGETS = ("conv", "linear", "addmm", "aten.mm", "batch_norm")


def build_mixed_net():
    """Every lifted kind in one small net: strided/dilated/depthwise/grouped convs, a conv called twice, a
    transposed conv, a 1-D conv with padding="same" and its BatchNorm1d, linears with and without bias, a
    free Parameter and a non-persistent buffer (left as get_attr), and a tuple-with-a-list output."""
    from torch import nn

    class MixedNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.dw = nn.Conv2d(16, 16, 3, 1, 2, dilation=2, groups=16)
            self.grouped = nn.Conv2d(16, 32, 1, groups=4)
            self.bn = nn.BatchNorm2d(32)
            self.shared = nn.Conv2d(32, 32, 3, padding=1)
            self.up = nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1)
            self.seq = nn.Conv1d(16, 8, 3, padding="same")
            self.seq_bn = nn.BatchNorm1d(8)
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8).reshape(1, 8, 1))
            self.register_buffer("offset", torch.full((1, 8, 1), 0.1), persistent=False)
            self.fc = nn.Linear(8, 5)
            self.head = nn.Linear(8, 3, bias=False)

        def forward(self, x):
            x = self.bn(self.grouped(self.dw(self.stem(x))))
            x = self.up(self.shared(self.shared(x).relu()))
            x = x.flatten(2)[:, :, :64]
            x = (self.seq_bn(self.seq(x)) * self.scale + self.offset).mean(2)
            return self.fc(x), [self.head(x)]

    torch.manual_seed(0)
    net = MixedNet()
    net.train()
    for _ in range(3):  # running statistics away from 0/1, so that eval differs from a fresh BN
        net(torch.randn(4, 3, 16, 16) * 2 + 1)
    return net.eval()


def save_and_load(program, path):
    torch.export.save(program, str(path))
    return torch.export.load(str(path))


def export_program(module, example, tmp_path, decompose: bool, dynamic_batch: bool = False):
    dynamic = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic_batch else None
    program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
    if decompose:
        program = program.run_decompositions()
    return save_and_load(program, tmp_path / ("decomposed.pt2" if decompose else "exported.pt2"))


def leaves(value) -> list:
    return torch.utils._pytree.tree_leaves(value)


def max_abs_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(leaves(a), leaves(b), strict=True))


def aten_left(lifted) -> list[str]:
    """Conv/linear/batch-norm calls the lift left as aten calls."""
    return [
        str(n.target)
        for n in lifted.graph.nodes
        if n.op == "call_function" and any(t in str(n.target) for t in LIFTED_TARGETS)
    ]


@pytest.fixture(scope="module", params=["exported", "decomposed"])
def mixed(request, tmp_path_factory):
    net = build_mixed_net()
    program = export_program(
        net, torch.randn(2, 3, 16, 16), tmp_path_factory.mktemp("mixed"), request.param == "decomposed"
    )
    return net, program


def test_convs_linears_and_batch_norms_become_modules_named_after_the_original(mixed):
    from torch import nn

    net, program = mixed
    lifted = lift_exported_program(program)

    assert aten_left(lifted) == []
    kinds = {name: type(m) for name, m in lifted.named_children()}
    assert kinds == {
        "stem_0": nn.Conv2d,
        "stem_1": nn.BatchNorm2d,
        "dw": nn.Conv2d,
        "grouped": nn.Conv2d,
        "bn": nn.BatchNorm2d,
        "shared": nn.Conv2d,
        "up": nn.ConvTranspose2d,
        "seq": nn.Conv1d,
        "seq_bn": nn.BatchNorm1d,
        "fc": nn.Linear,
        "head": nn.Linear,
    }
    assert module_names(lifted)["stem_0"] == "stem.0" and module_names(lifted)["seq_bn"] == "seq_bn"
    assert (lifted.dw.groups, lifted.dw.dilation, lifted.grouped.groups) == (16, (2, 2), 4)
    assert lifted.up.output_padding == (1, 1) and lifted.head.bias is None
    assert lifted.seq.padding in ("same", (1,))  # run_decompositions writes "same" out as (1,)
    # The conv called twice is one module called twice: its weight stays one weight.
    assert sum(1 for n in lifted.graph.nodes if n.op == "call_module" and n.target == "shared") == 2
    # What is not lifted keeps its kind: a Parameter, a buffer left out of the state_dict.
    assert isinstance(lifted.scale, nn.Parameter) and "offset" not in lifted.state_dict()
    assert torch.equal(lifted.stem_1.running_var, net.stem[1].running_var)


def test_lifted_output_matches_the_program_at_other_batch_sizes(mixed):
    net, program = mixed
    lifted = lift_exported_program(program)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = lifted(x)
        assert type(out) is tuple and type(out[1]) is list  # the program's output structure
        assert max_abs_diff(out, program.module()(x)) <= 1e-6
        for batch in (1, 5):  # the program was traced at 2; its guards and fixed reshapes are gone
            x = torch.randn(batch, 3, 16, 16)
            assert max_abs_diff(lifted(x), net(x)) <= 1e-5


def test_lifted_module_trains_and_leaves_the_program_alone(mixed):
    _, program = mixed
    lifted = lift_exported_program(program)
    kept = program.state_dict["bn.running_mean"].clone()
    mean = lifted.bn.running_mean.clone()

    lifted.train()
    out = lifted(torch.randn(4, 3, 16, 16))
    (out[0].square().mean() + out[1][0].square().mean()).backward()

    assert lifted.stem_0.weight.grad is not None and lifted.stem_0.weight.grad.abs().sum() > 0
    assert lifted.shared.weight.grad.abs().sum() > 0 and lifted.scale.grad is not None
    assert not torch.allclose(lifted.bn.running_mean, mean) and int(lifted.bn.num_batches_tracked) == 4
    assert torch.equal(program.state_dict["bn.running_mean"], kept)


@pytest.mark.parametrize("decompose", [False, True], ids=["exported", "decomposed"])
def test_a_program_exported_in_train_mode_lifts_its_batch_norm_updates(decompose, tmp_path):
    """Train-mode export writes batch_norm(training=True) + add_(num_batches_tracked), or, decomposed,
    _native_batch_norm_legit_functional whose new statistics are copy_'d back: the lifted BN does both."""
    net = build_mixed_net().train()
    x = torch.randn(4, 3, 16, 16)
    program = export_program(copy.deepcopy(net), x, tmp_path, decompose)
    lifted = lift_exported_program(program)
    assert aten_left(lifted) == []
    assert not any(str(n.target) == "aten.copy_.default" for n in lifted.graph.nodes)

    reference = program.module()
    lifted.train()
    assert max_abs_diff(lifted(x), reference(x)) <= 1e-5
    assert torch.allclose(lifted.bn.running_mean, reference.get_submodule("bn").running_mean, atol=1e-6)
    assert int(lifted.bn.num_batches_tracked) == int(net.bn.num_batches_tracked) + 1


def test_torch_pruning_prunes_a_lifted_conv(mixed):
    import torch_pruning as tp

    _, program = mixed
    lifted = lift_exported_program(program)
    x = torch.randn(2, 3, 16, 16)
    graph = tp.DependencyGraph().build_dependency(lifted, example_inputs=x)
    for name in ("shared", "up"):  # a conv called twice (its in and out channels are one), a transposed one
        conv = lifted.get_submodule(name)
        channels = conv.out_channels
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(8))).prune()
        assert conv.out_channels == channels - 8
    with torch.no_grad():
        assert [t.shape for t in leaves(lifted(x))] == [(2, 5), (2, 3)]


def test_only_an_exported_program_is_lifted():
    with pytest.raises(PassError) as raised:
        lift_exported_program(torch.nn.Linear(2, 2))
    assert raised.value.code == "unsupported_model"


@pytest.mark.parametrize(
    ("before", "after", "plan"),
    [
        ([1, 512, 1, 1], [1, 512], [(0,), (1, 2, 3)]),  # a decomposed flatten at batch 1
        ([2, 64, 4], [2, 64, 4, 1, 1], [(0,), (1,), (2,), 1, 1]),  # trailing 1s added
        ([6, 4], [2, 3, 4], [2, 3, (1,)]),  # a split keeps its sizes
        ([512], [1, 512], None),  # a leading 1 could be a batch of 1: left fixed
    ],
)
def test_fixed_reshapes_read_the_sizes_they_keep_from_their_input(before, after, plan):
    assert _reshape_plan(before, after) == plan


# --------------------------------------------------------------------------------------------
# Real architectures (slow: each export, re-export and ONNX export takes seconds)


@pytest.fixture(
    scope="module",
    # One of each form (the mixed net above covers both forms of every lifted kind in the fast layer).
    params=["resnet18:decomposed", "mobilenet_v3_small:exported"],
)
def torchvision_program(request, tmp_path_factory):
    import torchvision

    architecture, form = request.param.split(":")
    torch.manual_seed(0)
    net = torchvision.models.get_model(architecture, weights=None).eval()
    program = export_program(
        net, torch.randn(1, 3, 96, 96), tmp_path_factory.mktemp(architecture), form == "decomposed"
    )
    return architecture, net, program


@pytest.mark.integration
def test_torchvision_program_lifts_trains_and_prunes(torchvision_program):
    import torch_pruning as tp

    architecture, net, program = torchvision_program
    lifted = lift_exported_program(program)
    assert aten_left(lifted) == []
    x = torch.randn(3, 3, 96, 96)  # exported at batch 1
    with torch.no_grad():
        want = net(x)  # mobilenet_v3_small's random-init logits are ~1e-9: errors are relative to them
        assert max_abs_diff(lifted(x), want) <= 1e-5 * float(want.abs().max())

    graph = tp.DependencyGraph().build_dependency(copy.deepcopy(lifted), example_inputs=x[:1])
    pruned = graph.model
    convs = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    middle = convs[len(convs) // 2]
    channels = middle.out_channels
    graph.get_pruning_group(middle, tp.prune_conv_out_channels, idxs=list(range(8))).prune()
    assert middle.out_channels == channels - 8
    with torch.no_grad():
        assert pruned(x).shape == (3, 1000)

    lifted.train()
    bn = next(m for m in lifted.modules() if isinstance(m, torch.nn.BatchNorm2d))
    mean = bn.running_mean.clone()
    lifted(x).square().mean().backward()
    assert all(m.weight.grad is not None for m in lifted.modules() if isinstance(m, torch.nn.Conv2d))
    assert not torch.allclose(bn.running_mean, mean)


@pytest.mark.integration
def test_torchvision_lift_reexports_with_an_open_batch(torchvision_program, tmp_path):
    import onnxruntime as ort

    _, _, program = torchvision_program
    lifted = lift_exported_program(program)
    batch = ({0: torch.export.Dim("batch", min=1, max=64)},)
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        want = lifted(x)
    again = torch.export.export(lifted, (torch.randn(2, 3, 96, 96),), dynamic_shapes=batch)
    with torch.no_grad():
        assert max_abs_diff(again.module()(x), want) <= 1e-5 * float(want.abs().max())

    onnx_program = torch.onnx.export(lifted, (torch.randn(2, 3, 96, 96),), dynamo=True, dynamic_shapes=batch)
    onnx_program.save(str(tmp_path / "lifted.onnx"))
    session = ort.InferenceSession(str(tmp_path / "lifted.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert abs(got - want.numpy()).max() <= 1e-4 * float(want.abs().max())


def test_detector_program_with_an_open_batch_lifts_and_prunes_a_backbone_conv(tmp_path):
    import torch_pruning as tp

    from tests.synthetic_detector import load_detector

    net = load_detector()
    # Traced at batch 2: torch.export specialises an example batch of 1 to 1 even when it is marked dynamic.
    program = export_program(load_detector(), torch.rand(2, 3, 128, 128), tmp_path, False, dynamic_batch=True)
    lifted = lift_exported_program(program)
    assert aten_left(lifted) == [] and module_names(lifted)["down3_0_0"] == "down3.0.0"
    x = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        want = net(x)
        assert max_abs_diff(lifted(x), want) <= 1e-4 and max_abs_diff(lifted(x[:1]), want[:1]) <= 1e-4

    graph = tp.DependencyGraph().build_dependency(lifted, example_inputs=x[:2])
    conv = lifted.down3_0_0
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(8)))
    group.prune()
    assert (conv.out_channels, lifted.down3_0_1.num_features, lifted.down3_1_split_0.in_channels) == (40, 40, 40)
    with torch.no_grad():
        assert lifted(x).shape == want.shape
