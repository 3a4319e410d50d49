"""Keras and TensorFlow SavedModel uploads to TFLite: the upload is read without TensorFlow (no
model code runs in the API), the worker converts with tf.lite.TFLiteConverter, and every result
is run in the LiteRT interpreter against the TensorFlow model on held-out digits."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from core.errors import InvalidInput
from core.model_formats import inspect_model
from core.recipes import plan_job, resolve_steps
from core.schemas import StepSpec
from tests.test_passes import npz_ref, run_pass
from worker.litert import TfliteRunner, io_details
from worker.passes.base import ArtifactRef, PassContext

pytestmark = pytest.mark.integration

NHWC = [{"name": "image", "shape": [1, 8, 8, 1], "dtype": "float32"}]


@pytest.fixture(scope="module")
def keras_digits(digit_assets, tmp_path_factory):
    """A small Keras CNN trained on the digits (NHWC), saved as .keras and as a zipped SavedModel."""
    from worker.tf_models import import_tensorflow

    tf = import_tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    x = digit_assets.x.transpose(0, 2, 3, 1)
    y = digit_assets.y
    model = keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1), name="image"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, name="logits"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(x[:1200], y[:1200], epochs=40, batch_size=32, verbose=0)
    root = tmp_path_factory.mktemp("keras")
    keras_path = root / "digits.keras"
    model.save(keras_path)
    export_dir = root / "saved"
    model.export(str(export_dir), verbose=False)
    saved_zip = root / "digits_savedmodel.zip"
    with zipfile.ZipFile(saved_zip, "w") as zf:
        for path in export_dir.rglob("*"):
            if path.is_file():
                zf.write(path, "digits_savedmodel/" + str(path.relative_to(export_dir)))
    accuracy = float((model.predict(x[1500:1700], verbose=0).argmax(1) == y[1500:1700]).mean())
    assert accuracy > 0.85, accuracy  # it really learned the digits
    del tf
    return keras_path, saved_zip, accuracy


def test_keras_and_savedmodel_uploads_are_read_without_tensorflow(keras_digits):
    keras_path, saved_zip, _ = keras_digits
    info = inspect_model(keras_path)
    assert info.format == "keras"
    assert info.inputs == [{"name": "image", "shape": [None, 8, 8, 1], "dtype": "float32"}]
    assert info.outputs[0]["shape"] == [None, 10]
    saved = inspect_model(saved_zip)
    assert saved.format == "saved_model" and saved.details["signature"] == "serving_default"
    assert saved.details["root"] == "digits_savedmodel/"
    assert [(i["shape"], i["dtype"]) for i in saved.inputs] == [([None, 8, 8, 1], "float32")]
    assert saved.outputs[0]["shape"] == [None, 10]


def test_a_savedmodel_zip_with_an_escaping_path_is_refused(keras_digits, tmp_path):
    _, saved_zip, _ = keras_digits
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(saved_zip) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item))
        dst.writestr("../outside.txt", b"x")
    with pytest.raises(InvalidInput) as err:
        inspect_model(evil)
    assert err.value.code == "unsafe_archive"


def context(tmp_path: Path, original: ArtifactRef, **kw) -> PassContext:
    from core.schemas import Preprocessing

    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    return PassContext(
        work_dir=work,
        original=original,
        artifacts=[],
        input_spec=NHWC,
        preprocessing=Preprocessing(mean=[0.0], std=[1.0]),
        **kw,
    )


def tflite_accuracy(path: Path, digit_assets) -> float:
    runner = TfliteRunner(path, layout="source")
    x, y = digit_assets.x[1500:1700].transpose(0, 2, 3, 1), digit_assets.y[1500:1700]
    logits = np.concatenate([runner({"image": x[i : i + 1]})[0] for i in range(len(x))])
    return float((logits.argmax(1) == y).mean())


@pytest.mark.parametrize(
    ("fmt", "precision", "io_dtype"),
    [
        ("keras", "fp32", "auto"),
        ("keras", "dynamic", "auto"),
        ("keras", "fp16", "auto"),
        ("keras", "int8", "auto"),
        ("saved_model", "int8", "uint8"),
        ("saved_model", "fp16", "auto"),
    ],
)
def test_tensorflow_models_convert_verify_and_keep_accuracy(
    fmt, precision, io_dtype, keras_digits, digit_assets, tmp_path
):
    keras_path, saved_zip, keras_accuracy = keras_digits
    path = keras_path if fmt == "keras" else saved_zip
    info = inspect_model(path)
    original = ArtifactRef(path.name, fmt, path, meta=info.details)
    ctx = context(
        tmp_path,
        original,
        calibration_dataset=npz_ref(digit_assets.calibration_npz, False, 256),
        evaluation_dataset=npz_ref(digit_assets.labeled_npz, True, 297),
    )
    result = run_pass(
        "convert_tflite", ctx, original, precision=precision, io_dtype=io_dtype, num_calibration_samples=128
    )
    assert result.metrics["converter"] == "tf.lite.TFLiteConverter"
    verification = result.metrics["verification"]
    assert verification["inputs"] == "dataset"
    assert verification["snr_db"] >= verification["min_snr_db"]
    assert result.metrics["interpreter"]["ops_delegated"] > 0
    io = io_details(result.artifact)["inputs"][0]
    assert io["shape"] == [1, 8, 8, 1]
    if precision == "int8":
        assert io["dtype"] == ("uint8" if io_dtype == "uint8" else "int8")
        assert result.metrics["calibration_samples"] == 128
    else:
        assert io["dtype"] == "float32"
    assert tflite_accuracy(result.artifact, digit_assets) >= keras_accuracy - (0.03 if precision == "int8" else 0.01)


def test_measuring_steps_run_the_tensorflow_original(keras_digits, digit_assets, tmp_path):
    keras_path, _, _ = keras_digits
    original = ArtifactRef(keras_path.name, "keras", keras_path)
    ctx = context(tmp_path, original, evaluation_dataset=npz_ref(digit_assets.labeled_npz, True, 297))
    bench = run_pass("benchmark", ctx, original, batch_sizes=[1], runs=5, warmup=1)
    assert bench.metrics["results"][0]["runtime"]["name"] == "tensorflow"
    evaluation = run_pass("evaluate", ctx, original, batch_size=16)
    import keras

    model = keras.models.load_model(keras_path)
    x, y = digit_assets.x[1500:].transpose(0, 2, 3, 1), digit_assets.y[1500:]
    want = float((model.predict(x, verbose=0).argmax(1) == y).mean())
    samples = evaluation.metrics["results"][0]["samples"]
    assert samples == evaluation.metrics["num_samples"] == 297  # every held-out digit, the last batch of 9 too
    got = evaluation.metrics["results"][0]["accuracy"]["top1"]
    assert abs(got - want) < 10 / samples  # the same model on almost the same digits


def test_tensorflow_uploads_plan_for_tflite_only():
    steps = resolve_steps(preset="tflite-int8", steps=None)
    facts = None
    plan = plan_job(
        model_format="keras",
        model_inputs=[{"name": "image", "shape": [None, 8, 8, 1], "dtype": "float32"}],
        steps=steps,
        input_shape=None,
        calibration=_facts(),
        evaluation=facts,
    )
    assert plan.input_spec == NHWC
    with pytest.raises(InvalidInput) as err:
        plan_job(
            model_format="saved_model",
            model_inputs=NHWC,
            steps=resolve_steps(preset="onnx-int8", steps=None),
            input_shape=None,
            calibration=_facts(),
            evaluation=None,
        )
    assert "tf2onnx" in err.value.message
    with pytest.raises(InvalidInput):
        plan_job(
            model_format="keras",
            model_inputs=NHWC,
            input_shape=None,
            calibration=None,
            evaluation=None,
            steps=[StepSpec(name="convert_tflite", config={"precision": "int8"})],
        )


def _facts():
    from core.recipes import DatasetFacts

    return DatasetFacts(id="d", layout="NCHW", sample_shape=[1, 8, 8])


@pytest.mark.integration
def test_a_keras_upload_through_the_api_to_an_int8_tflite(stack, keras_digits, digit_assets, tmp_path):
    import hashlib

    import httpx

    from tests.test_end_to_end import upload

    keras_path, _, keras_accuracy = keras_digits
    client = stack.client
    model = upload(client, "/v1/models", keras_path, name="keras-digits")
    assert model["format"] == "keras" and model["inputs"][0]["shape"] == [None, 8, 8, 1]
    calibration = upload(client, "/v1/datasets", digit_assets.calibration_npz)
    evaluation = upload(client, "/v1/datasets", digit_assets.labeled_npz)
    resp = client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "preset": "tflite-int8",
            "calibration_dataset_id": calibration["id"],
            "evaluation_dataset_id": evaluation["id"],
            "preprocessing": {"mean": [0.0], "std": [1.0]},
        },
    )
    assert resp.status_code == 202, resp.text
    job = stack.wait_for_job(resp.json()["id"])
    assert job["status"] == "succeeded", (job["error"], job["log_tail"])
    (artifact,) = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    content = httpx.get(artifact["url"], timeout=60).content
    assert hashlib.sha256(content).hexdigest() == artifact["sha256"]
    path = tmp_path / artifact["name"]
    path.write_bytes(content)
    assert io_details(path)["inputs"][0]["dtype"] == "int8"
    assert tflite_accuracy(path, digit_assets) >= keras_accuracy - 0.03
    entries = {e["step"]: e for e in client.get(f"/v1/jobs/{job['id']}/report").json()["entries"]}
    assert entries[None]["runtime"]["name"] == "tensorflow"
    assert entries["convert_tflite"]["runtime"]["name"] == "litert"
