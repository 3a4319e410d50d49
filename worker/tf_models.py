"""TensorFlow uploads (Keras .keras archives, zipped SavedModels): loaded only inside the worker's
step, with Keras' safe mode (no arbitrary Python from a config), and run on numpy inputs."""

from __future__ import annotations

import importlib
import importlib.util
import os
import zipfile
from pathlib import Path

import numpy as np

from core.errors import PassError
from core.formats import KERAS, SAVED_MODEL
from worker.passes.base import ArtifactRef


def import_tensorflow():
    """TensorFlow, imported the way this process survives (every import of it goes here)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Importing torchao (litert-torch's quantizer) after TensorFlow segfaults the process
    # (TF 2.21, torchao 0.18, seen here); imported first, both load. A worker process runs
    # TensorFlow and PyTorch jobs one after the other, so the order is fixed here.
    if importlib.util.find_spec("torchao") is not None:
        importlib.import_module("torchao")
    import tensorflow as tf

    return tf


def extract_saved_model(ref: ArtifactRef) -> Path:
    """Unzip a SavedModel next to the upload (paths were checked at upload) and return its root."""
    target = ref.path.with_suffix(".savedmodel")
    if not target.exists():
        with zipfile.ZipFile(ref.path) as zf:
            for info in zf.infolist():
                name = info.filename
                if name.startswith("/") or ".." in name.split("/"):
                    raise PassError(f"unsafe path in the archive: {name!r}", code="unsafe_archive")
            zf.extractall(target)
    return target / (ref.meta.get("root") or "")


def load_keras(ref: ArtifactRef):
    import_tensorflow()
    import keras

    path = ref.path
    if path.suffix != ".keras":  # Keras insists on the extension
        path = path.with_suffix(".keras")
        if not path.exists():
            os.link(ref.path, path)
    try:
        return keras.models.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError/TypeError for what it cannot rebuild
        raise PassError(
            f"the Keras model could not be loaded: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
            code="invalid_model",
        ) from exc


def tf_runner(ref: ArtifactRef):
    """numpy feeds (in the model's own layout, usually NHWC) -> list of numpy outputs."""
    tf = import_tensorflow()
    if ref.format == KERAS:
        model = load_keras(ref)

        def run_keras(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            out = model(*[tf.constant(v) for v in feeds.values()], training=False)
            out = out if isinstance(out, (list, tuple)) else [out]
            return [np.asarray(o) for o in out]

        return run_keras
    if ref.format == SAVED_MODEL:
        loaded = tf.saved_model.load(str(extract_saved_model(ref)))
        signature = loaded.signatures[ref.meta.get("signature") or "serving_default"]
        names = list(signature.structured_input_signature[1].keys())

        def run_saved(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            values = list(feeds.values())
            out = signature(**{n: tf.constant(v) for n, v in zip(names, values, strict=True)})
            return [np.asarray(out[k]) for k in sorted(out)]

        return run_saved
    raise ValueError(f"{ref.format} is not a TensorFlow model")
