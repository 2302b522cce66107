"""ONNX export of the components: export, clean, and agreement with PyTorch in onnxruntime (CPU, tiny)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")

from onnx import TensorProto, helper  # noqa: E402

from pi_build.engine import build_components  # noqa: E402
from pi_build.engine.accuracy import metrics as compare_arrays  # noqa: E402
from pi_build.engine.layers import Shapes  # noqa: E402
from pi_build.errors import OnnxExportError, OnnxMismatchError  # noqa: E402
from pi_build.spec import Gate  # noqa: E402
from pi_build.model.pi0 import build_model  # noqa: E402
from pi_build.backends.onnx import (  # noqa: E402
    clean_onnx,
    describe_onnx,
    export_onnx,
    verify_onnx,
)

try:
    import onnx_graphsurgeon  # noqa: F401

    HAVE_GRAPHSURGEON = True
except ImportError:
    HAVE_GRAPHSURGEON = False


def tiny_components(name: str) -> dict[str, nn.Module]:
    model = build_model(name, seed=3)
    # Two Euler steps keep the unrolled denoise graph (and its export time) small.
    spec = Shapes(batch=1, cameras=2, prompt_len=16, horizon=model.cfg.action_horizon, steps=2)
    return build_components(model, spec)


@pytest.fixture(scope="module")
def pi05_components() -> dict[str, nn.Module]:
    return tiny_components("pi05_tiny")


def export_component(module: nn.Module, path: Path, seed: int = 0) -> Path:
    inputs = module.example_inputs(torch.Generator().manual_seed(seed))
    return export_onnx(module, inputs, module.input_names, module.output_names, path)


def check_component(module: nn.Module, path: Path) -> None:
    """Export, clean, verify: the graph has the module's fixed-shape I/O and matches it to 1e-4."""
    inputs = module.example_inputs(torch.Generator().manual_seed(0))
    export_component(module, path)
    facts = describe_onnx(path)
    assert list(facts["inputs"]) == list(module.input_names)  # every input kept, in order
    assert list(facts["outputs"]) == list(module.output_names)
    for name, x in zip(module.input_names, inputs):
        assert facts["inputs"][name]["shape"] == list(x.shape)  # static: no dynamic axes
    assert facts["float64_tensors"] == []  # TensorRT has no float64

    cleaning = clean_onnx(path)
    if HAVE_GRAPHSURGEON:
        assert cleaning["cleaned"] and cleaning["nodes_after"] <= cleaning["nodes_before"]
    else:
        assert not cleaning["cleaned"] and "onnx-graphsurgeon" in cleaning["note"]

    report = verify_onnx(path, module, generator=torch.Generator().manual_seed(7), n_checks=2)
    assert set(report["outputs"]) == set(module.output_names)
    for name, metrics in report["outputs"].items():
        if "mismatches" in metrics:  # prefix_mask
            assert metrics["mismatches"] == 0
        else:
            assert metrics["rel_err"] < 1e-4 and metrics["cosine"] > 0.9999, (name, metrics)


@pytest.mark.slow
@pytest.mark.parametrize("component", ["vision", "kvcache", "denoise"])
def test_pi05_component_exports_cleans_and_matches_pytorch(pi05_components, component, tmp_path):
    check_component(pi05_components[component], tmp_path / f"{component}.onnx")


@pytest.mark.slow
def test_pi0_denoise_exports_and_matches_pytorch(tmp_path):
    # pi0's suffix differs from pi0.5's (state token, time MLP instead of adaRMS); it reads `state`.
    check_component(tiny_components("pi0_tiny")["denoise"], tmp_path / "denoise.onnx")


# ----------------------------------------------------------------------------- a small module


class Toy(nn.Module):
    """float, bool and int64 inputs; float and bool outputs, like the kvcache component."""

    input_names = ("x", "mask", "ids")
    output_names = ("y", "valid")

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.proj = nn.Linear(8, 8).to(dtype)
        self.table = nn.Parameter(torch.randn(16, 8, generator=gen))

    def example_inputs(self, generator: torch.Generator) -> tuple[Tensor, ...]:
        x = torch.randn(2, 5, 8, generator=generator)
        mask = torch.rand(2, 5, generator=generator) > 0.5
        ids = torch.randint(0, 16, (2, 5), generator=generator)
        return x, mask, ids

    def forward(self, x: Tensor, mask: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        h = self.proj(x.to(self.proj.weight.dtype)).float() + self.table[ids]
        y = torch.where(mask[..., None], h, torch.zeros_like(h))
        return y, mask & (ids > 3)


def test_toy_with_bool_and_int64_inputs_matches(tmp_path):
    toy = Toy().eval()
    path = export_component(toy, tmp_path / "toy.onnx")
    facts = describe_onnx(path)
    assert {n: v["dtype"] for n, v in facts["inputs"].items()} == {"x": "FLOAT", "mask": "BOOL", "ids": "INT64"}
    report = verify_onnx(path, toy, generator=torch.Generator().manual_seed(1), n_checks=3)
    assert report["checks"] == 3
    assert report["outputs"]["y"]["rel_err"] < 1e-6
    assert report["outputs"]["valid"] == {"mismatches": 0}


def test_gate_fails_when_module_and_graph_disagree(tmp_path):
    toy = Toy().eval()
    path = export_component(toy, tmp_path / "toy.onnx")
    with torch.no_grad():  # the graph keeps the old weights; the module moves on
        toy.proj.bias.add_(0.05 * torch.randn(8, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(OnnxMismatchError, match=r"output 'y' \(draw 0\): accuracy gate failed: .* rel_err .* \(needs <= 0.0001\)"):
        verify_onnx(path, toy, generator=torch.Generator().manual_seed(1))
    # The same disagreement passes a gate loose enough for it.
    report = verify_onnx(path, toy, generator=torch.Generator().manual_seed(1), gate=Gate(cosine=1e-9, rel_err=1.0))
    assert 1e-4 < report["outputs"]["y"]["rel_err"] < 1.0


def test_gate_on_bool_output_is_exact(tmp_path):
    toy = Toy().eval()
    path = export_component(toy, tmp_path / "toy.onnx")

    class Flipped(Toy):  # same float output, one bool element flipped
        def forward(self, x, mask, ids):
            y, valid = super().forward(x, mask, ids)
            valid = valid.clone()
            valid[0, 0] = ~valid[0, 0]
            return y, valid

    flipped = Flipped().eval()
    flipped.load_state_dict(toy.state_dict())
    with pytest.raises(OnnxMismatchError, match=r"output 'valid' \(draw 0\): 1 elements differ"):
        verify_onnx(path, flipped, generator=torch.Generator().manual_seed(1))


def test_verify_refuses_bf16_graph(tmp_path):
    toy = Toy(torch.bfloat16).eval()
    path = export_component(toy, tmp_path / "toy_bf16.onnx")
    assert "BFLOAT16" in describe_onnx(path)["weight_dtypes"]
    with pytest.raises(ValueError, match="BFLOAT16 weights; verify_onnx compares in float32"):
        verify_onnx(path, toy, generator=torch.Generator().manual_seed(1))


def test_compare_arrays_hand_computed():
    m = compare_arrays(np.array([1.0, 2.0, 2.0], np.float32), np.array([1.0, 2.0, 3.0], np.float32))
    assert m["max_abs"] == pytest.approx(1.0)
    assert m["rel_err"] == pytest.approx(1 / math.sqrt(14))
    assert m["cosine"] == pytest.approx(11 / (3 * math.sqrt(14)))
    assert compare_arrays(np.array([True, False, True]), np.array([True, True, False])) == {"mismatches": 2}
    nan = compare_arrays(np.array([np.nan, 1.0]), np.array([1.0, 1.0]))
    assert math.isnan(nan["rel_err"])


# ----------------------------------------------------------------------------- files


def test_external_data_is_written_beside_and_survives_cleaning(tmp_path):
    toy = Toy().eval()
    inputs = toy.example_inputs(torch.Generator().manual_seed(0))
    path = export_onnx(toy, inputs, toy.input_names, toy.output_names, tmp_path / "toy.onnx", external_data=True)
    data = tmp_path / "toy.onnx.data"
    assert data.is_file() and data.stat().st_size > 0
    clean_onnx(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.onnx", "toy.onnx.data"]  # no temp files left
    report = verify_onnx(path, toy, generator=torch.Generator().manual_seed(1))
    assert report["outputs"]["y"]["rel_err"] < 1e-6


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.export refuses it instead of baking one branch."""

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return x * 2
        return x


def test_failed_export_leaves_nothing_at_target(tmp_path):
    path = tmp_path / "out" / "model.onnx"
    with pytest.raises(OnnxExportError, match="exporting DataDependent to ONNX failed"):
        export_onnx(DataDependent(), (torch.randn(3),), ["x"], ["y"], path)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # no staging folder left behind


def test_failed_export_keeps_previous_file(tmp_path):
    path = tmp_path / "model.onnx"
    toy = Toy().eval()
    export_component(toy, path)
    before = path.read_bytes()
    with pytest.raises(OnnxExportError):
        export_onnx(DataDependent(), (torch.randn(3),), ["x"], ["y"], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_export_rejects_mismatched_names(tmp_path):
    toy = Toy().eval()
    inputs = toy.example_inputs(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="3 example inputs but 2 input names"):
        export_onnx(toy, inputs, ["x", "mask"], toy.output_names, tmp_path / "a.onnx")
    with pytest.raises(OnnxExportError, match=r"Toy returns 2 outputs \['y', '\w+'\], but output_names are \['y'\]"):
        export_onnx(toy, inputs, toy.input_names, ["y"], tmp_path / "b.onnx")
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- cleaning


def foldable_graph(path: Path) -> None:
    """y = x * (c1 + c2): the Add of two constants is what constant folding removes."""
    c1 = helper.make_tensor("c1", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    c2 = helper.make_tensor("c2", TensorProto.FLOAT, [4], [0.5, 0.5, 0.5, 0.5])
    nodes = [helper.make_node("Add", ["c1", "c2"], ["c"]), helper.make_node("Mul", ["x", "c"], ["y"])]
    graph = helper.make_graph(
        nodes, "foldable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        initializer=[c1, c2],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.mark.skipif(not HAVE_GRAPHSURGEON, reason="onnx-graphsurgeon is not installed")
def test_clean_folds_constants_and_keeps_results(tmp_path):
    path = tmp_path / "g.onnx"
    foldable_graph(path)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    report = clean_onnx(path)
    assert (report["cleaned"], report["nodes_before"], report["nodes_after"]) == (True, 2, 1)
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(after, x * np.array([1.5, 2.5, 3.5, 4.5], np.float32))
    np.testing.assert_array_equal(after, before)


def test_clean_without_graphsurgeon_leaves_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "g.onnx"
    foldable_graph(path)
    before = path.read_bytes()
    monkeypatch.setitem(sys.modules, "onnx_graphsurgeon", None)  # import now raises ImportError
    report = clean_onnx(path)
    assert report["cleaned"] is False
    assert (report["nodes_before"], report["nodes_after"]) == (2, 2)
    assert "onnx-graphsurgeon is not installed" in report["note"]
    assert path.read_bytes() == before
