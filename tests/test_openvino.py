"""OpenVINO as a target: convert_openvino alone on the digit CNN (ONNX and .pt2) and on a real
model, the OpenVINO runtime in benchmark and evaluate, and planning. Setup, execute, assert on the
artifact; the conversions are the integration layer, the archive and planning checks are fast."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from core.errors import InvalidInput, PassError
from core.formats import OPENVINO_IR
from core.recipes import PRESETS, DatasetFacts, plan_job
from core.recommend import step_keeps_float
from core.schemas import Preprocessing, StepSpec
from worker.openvino_ir import write_ir_archive
from worker.passes.base import ArtifactRef, DatasetRef, PassContext
from worker.passes.registry import get_pass
from worker.runtime import load_runner, runtime_info

SPEC = [{"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32"}]
PREP = Preprocessing(mean=[0.0], std=[1.0])
integration = pytest.mark.integration


def context(tmp_path: Path, original: ArtifactRef, artifacts=(), input_spec=SPEC, prep=PREP, **kw) -> PassContext:
    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    return PassContext(
        work_dir=work,
        original=original,
        artifacts=list(artifacts),
        input_spec=input_spec,
        preprocessing=prep,
        threads=2,
        **kw,
    )


def convert(tmp_path: Path, source: ArtifactRef, name: str = "ir.openvino.zip", ctx=None, **config) -> ArtifactRef:
    """Run convert_openvino and keep its artifact as the runner would (meta included)."""
    cls = get_pass("convert_openvino")
    result = cls().run(ctx or context(tmp_path, source), source, cls.Config(**config))
    assert result.format == OPENVINO_IR
    dest = tmp_path / name
    shutil.copyfile(result.artifact, dest)
    ref = ArtifactRef(name, OPENVINO_IR, dest, step="convert_openvino", meta=result.meta)
    return ref, result


def npz_ref(path: Path, *, labeled: bool, n: int) -> DatasetRef:
    return DatasetRef(path=path, format="npz", labeled=labeled, num_samples=n, layout="NCHW", sample_shape=[1, 8, 8])


def plan(model_format: str, steps: list[StepSpec], calibration: DatasetFacts | None = None):
    inputs = [{"name": "image", "shape": ["n", 1, 8, 8], "dtype": "float32"}]
    return plan_job(
        model_format=model_format,
        model_inputs=inputs,
        steps=steps,
        input_shape=None,
        calibration=calibration,
        evaluation=None,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- fast: the archive, planning, the recommendation's rule ---------------------------------------


def test_the_archive_holds_the_two_ir_files_byte_for_byte_the_same_every_time(tmp_path):
    ir = tmp_path / "ir"
    ir.mkdir()
    (ir / "model.xml").write_text("<net/>" * 100)
    (ir / "model.bin").write_bytes(bytes(range(256)) * 10)
    (ir / "stray.txt").write_text("not shipped")
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    write_ir_archive(ir, first)
    (ir / "model.bin").touch()  # a newer mtime changes nothing
    write_ir_archive(ir, second)
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as archive:
        assert archive.namelist() == ["model.xml", "model.bin"]
        assert archive.read("model.bin") == (ir / "model.bin").read_bytes()
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_the_openvino_preset_plans_on_an_onnx_upload_and_the_step_refuses_torchscript_with_advice():
    facts = DatasetFacts(id="d", layout="NCHW", sample_shape=[1, 8, 8])
    preset = plan("onnx", PRESETS["openvino"], calibration=facts)
    assert [s.name for s in preset.steps] == ["export_onnx", "convert_openvino", "benchmark", "evaluate"]
    assert preset.steps[1].config == {
        "weights": "fp32",
        "inference_precision": "auto",
        "min_snr_db": None,
        "static_shape": False,
        "verify_samples": 32,
    }
    # The IR ends its branch: the next producing step starts again from the ONNX export.
    chained = [StepSpec(name="export_onnx"), StepSpec(name="convert_openvino"), StepSpec(name="convert_fp16")]
    assert [s.name for s in plan("onnx", chained).steps] == [s.name for s in chained]
    for upload in ("torchscript", "state_dict"):
        with pytest.raises(InvalidInput) as err:
            plan(upload, [StepSpec(name="convert_openvino")])
        assert err.value.code == "steps_do_not_chain"
        assert "add export_onnx before convert_openvino" in err.value.message
    with pytest.raises(InvalidInput) as err:
        plan("onnx", [StepSpec(name="convert_openvino", config={"inference_precision": "int8"})])
    assert err.value.code == "invalid_step_config"


def test_only_fp32_weights_computed_in_f32_count_as_a_lossless_conversion():
    assert step_keeps_float("convert_openvino", {"precision": "fp32"})
    assert not step_keeps_float("convert_openvino", {"precision": "fp32 weights, bf16 compute"})
    assert not step_keeps_float("convert_openvino", {"precision": "fp16 weights, f32 compute"})


# -- integration: real conversions and measurements -------------------------------------------------


@pytest.fixture(scope="module")
def digits_onnx(digit_assets) -> ArtifactRef:
    return ArtifactRef("digits.onnx", "onnx", digit_assets.models["onnx"])


@integration
@pytest.mark.parametrize("weights", ["fp32", "fp16"])
def test_onnx_converts_to_a_verified_ir_that_openvino_reads_after_unpacking(digits_onnx, tmp_path, weights):
    import openvino as ov

    ref, result = convert(tmp_path, digits_onnx, weights=weights)
    with zipfile.ZipFile(ref.path) as archive:
        assert archive.namelist() == ["model.xml", "model.bin"]
        archive.extractall(tmp_path / "unpacked")
    model = ov.Core().read_model(str(tmp_path / "unpacked" / "model.xml"))
    assert [i.get_any_name() for i in model.inputs] == ["image"]
    assert model.inputs[0].get_partial_shape().to_string() == "[?,1,8,8]"  # the ONNX's open batch kept

    metrics = result.metrics
    assert metrics["weights"] == weights and metrics["inference_precision_hint"] == "auto"
    assert metrics["inference_precision"] in {"f32", "bf16"}
    assert metrics["openvino"] == ov.get_version()
    assert metrics["size_bytes"] == ref.path.stat().st_size
    verification = metrics["verification"]
    assert verification["samples"] == 32 and verification["snr_db"] >= verification["min_snr_db"] >= 20
    assert ref.meta["inference_precision"] == "auto" and ref.meta["weights"] == weights
    onnx_weights = digits_onnx.path.stat().st_size
    assert metrics["weights_bytes"] < (0.6 if weights == "fp16" else 1.05) * onnx_weights
    # The same conversion again is the same file (the cache and the download's sha256 rely on it).
    again, _ = convert(tmp_path / "again", digits_onnx, weights=weights)
    assert sha256(again.path) == sha256(ref.path)


@integration
def test_f32_compute_is_the_lossless_float_conversion(digits_onnx, tmp_path):
    ref, result = convert(tmp_path, digits_onnx, inference_precision="f32")
    assert result.metrics["inference_precision"] == "f32"
    assert result.metrics["verification"]["snr_db"] > 80 and result.metrics["verification"]["min_snr_db"] == 40
    assert ref.meta["precision"] == "fp32"
    assert runtime_info(ref, threads=2)["inference_precision"] == "f32"


@integration
def test_a_pt2_converts_with_its_programs_shapes_and_matches_on_the_jobs_images(digit_assets, tmp_path):
    source = ArtifactRef("digits.pt2", "exported_program", digit_assets.models["pt2"])
    images = npz_ref(digit_assets.calibration_npz, labeled=False, n=256)
    ref, result = convert(tmp_path, source, ctx=context(tmp_path, source, calibration_dataset=images))
    assert result.metrics["source_format"] == "exported_program"
    verification = result.metrics["verification"]
    assert verification["inputs"] == "dataset" and verification["samples"] == 32
    assert verification["cosine"] > 0.999
    run = load_runner(ref, threads=2)
    assert [o.shape for o in run({"image": digit_assets.x[:1]})] == [(1, 10)]


@integration
def test_benchmark_and_evaluate_measure_the_ir_in_openvino(digit_assets, digits_onnx, tmp_path):
    ir, _ = convert(tmp_path, digits_onnx)
    original = ArtifactRef("digits.pt2", "exported_program", digit_assets.models["pt2"])
    labeled = npz_ref(digit_assets.labeled_npz, labeled=True, n=297)
    ctx = context(tmp_path, original, artifacts=[digits_onnx, ir], evaluation_dataset=labeled)
    bench = get_pass("benchmark")
    rows = bench().run(ctx, ir, bench.Config(runs=10, warmup=1, batch_sizes=[1, 8])).metrics["results"]
    row = rows[-1]
    assert row["artifact"] == ir.name and row["format"] == OPENVINO_IR
    assert row["runtime"]["name"] == "openvino" and row["runtime"]["threads"] == 2
    assert row["runtime"]["inference_precision"] in {"f32", "bf16"}
    assert row["latency"]["1"]["p50_ms"] > 0 and row["latency"]["8"]["images_per_s"] > 0  # dynamic batch

    evaluate = get_pass("evaluate")
    results = evaluate().run(ctx, ir, evaluate.Config(batch_size=16)).metrics["results"]
    entry = {r["artifact"]: r for r in results}[ir.name]
    assert entry["samples"] == 297  # the last, partial batch too
    assert entry["accuracy"]["top1"] > 0.85 and entry["fidelity"]["top1_agreement"] >= 0.99
    assert entry["metric"]["drop"] <= 0.01


@integration
@pytest.mark.parametrize("batch", [1, 4])
def test_a_static_shape_ir_takes_the_jobs_shape_only_and_benchmark_says_so(digit_assets, digits_onnx, tmp_path, batch):
    import openvino as ov

    spec = [dict(SPEC[0], shape=[batch, 1, 8, 8])]
    images = npz_ref(digit_assets.calibration_npz, labeled=False, n=256)
    ctx = context(tmp_path, digits_onnx, input_spec=spec, calibration_dataset=images)
    ref, result = convert(tmp_path, digits_onnx, ctx=ctx, static_shape=True)
    with zipfile.ZipFile(ref.path) as archive:
        archive.extractall(tmp_path / "unpacked")
    model = ov.Core().read_model(str(tmp_path / "unpacked" / "model.xml"))
    assert model.inputs[0].get_partial_shape().to_string() == f"[{batch},1,8,8]"
    assert ref.meta["static_shape"] == result.metrics["static_shape"] == [[batch, 1, 8, 8]]
    verification = result.metrics["verification"]  # fed at the IR's batch, on the job's images
    assert verification["inputs"] == "dataset" and verification["samples"] == 32
    assert verification["snr_db"] >= verification["min_snr_db"]

    labeled = npz_ref(digit_assets.labeled_npz, labeled=True, n=297)
    ctx = context(tmp_path / "measure", digits_onnx, artifacts=[ref], input_spec=spec, evaluation_dataset=labeled)
    bench = get_pass("benchmark")
    rows = bench().run(ctx, ref, bench.Config(runs=5, warmup=1, batch_sizes=[batch, 8])).metrics["results"]
    latency = {r["artifact"]: r for r in rows}[ref.name]["latency"]
    assert latency[str(batch)]["p50_ms"] > 0
    assert latency["8"] == {"error": f"the model's batch axis is fixed at {batch}"}
    assert "p50_ms" in {r["artifact"]: r for r in rows}[digits_onnx.name]["latency"]["8"]  # the source's is open
    # evaluate runs it at its own batch (the last, partial batch padded), as accurate as its source
    evaluate = get_pass("evaluate")
    results = evaluate().run(ctx, ref, evaluate.Config(batch_size=16)).metrics["results"]
    entry = {r["artifact"]: r for r in results}[ref.name]
    assert entry["samples"] == 297 and entry["fidelity"]["top1_agreement"] >= 0.99


@integration
def test_a_shape_the_graph_cannot_take_is_a_clean_pass_error(tmp_path):
    from tests import synthetic_detector as shapes

    source = ArtifactRef("shapes_yolo.onnx", "onnx", shapes.FIXTURES / shapes.FIXTURE_FILES["yolo"])
    spec = [{"name": "images", "shape": [1, 3, 100, 128], "dtype": "float32"}]  # not a multiple of the stride
    with pytest.raises(PassError) as err:
        convert(tmp_path, source, ctx=context(tmp_path, source, input_spec=spec), static_shape=True)
    assert err.value.code == "shape_mismatch" and "[[1, 3, 100, 128]]" in err.value.message


@integration
def test_a_corrupt_archive_and_an_unreachable_floor_are_clean_pass_errors(digits_onnx, tmp_path):
    ref, _ = convert(tmp_path, digits_onnx)
    broken = tmp_path / "broken.openvino.zip"
    with zipfile.ZipFile(ref.path) as src, zipfile.ZipFile(broken, "w") as dst:
        dst.writestr("model.xml", b"<net><layers>")
        dst.writestr("model.bin", src.read("model.bin"))
    not_a_zip = tmp_path / "garbage.openvino.zip"
    not_a_zip.write_bytes(b"\x00" * 64)
    missing_weights = tmp_path / "xml_only.openvino.zip"
    with zipfile.ZipFile(ref.path) as src, zipfile.ZipFile(missing_weights, "w") as dst:
        dst.writestr("model.xml", src.read("model.xml"))
    for path in (broken, not_a_zip, missing_weights):
        with pytest.raises(PassError) as err:
            load_runner(ArtifactRef(path.name, OPENVINO_IR, path), threads=1)
        assert err.value.code == "corrupt_model", path.name

    with pytest.raises(PassError) as err:
        convert(tmp_path / "floor", digits_onnx, min_snr_db=400)
    assert err.value.code == "openvino_mismatch"
    assert "< 400 dB" in err.value.message and err.value.details["inference_precision"] in {"f32", "bf16"}


@integration
def test_a_real_classifier_converts_in_the_cpus_own_precision(tmp_path):
    import onnx

    from tests.real_models import ORIENTATION, asset

    source = ArtifactRef("orientation.onnx", "onnx", asset(ORIENTATION.file))
    input_name = onnx.load(str(source.path), load_external_data=False).graph.input[0].name
    spec = [{"name": input_name, "shape": ORIENTATION.input_shape, "dtype": "float32"}]
    ctx = context(tmp_path, source, input_spec=spec, prep=Preprocessing(**ORIENTATION.preprocessing))
    ref, result = convert(tmp_path, source, ctx=ctx, weights="fp16")
    verification = result.metrics["verification"]
    assert verification["snr_db"] >= verification["min_snr_db"]
    assert result.metrics["size_bytes"] < 0.6 * source.path.stat().st_size
    x = np.random.default_rng(0).standard_normal((2, *ORIENTATION.input_shape[1:])).astype(np.float32)
    assert load_runner(ref, threads=2)({spec[0]["name"]: x})[0].shape[0] == 2
