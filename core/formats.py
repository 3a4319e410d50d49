"""The artifact formats: the one definition of their names, shared by the API (what an upload is,
which steps chain), the recommendation (where a branch ends) and the worker (how to load, run and
name each). Plain strings, stored as they are in job rows and artifact metadata."""

from __future__ import annotations

# Model formats an upload can be, that the graph and PyTorch steps take.
ONNX = "onnx"
TORCHSCRIPT = "torchscript"
EXPORTED_PROGRAM = "exported_program"
STATE_DICT = "state_dict"  # weights of a named torchvision architecture (ArtifactRef.meta)
TORCH_FORMATS = frozenset({TORCHSCRIPT, EXPORTED_PROGRAM, STATE_DICT})
ALL_MODEL_FORMATS = frozenset({ONNX, TORCHSCRIPT, EXPORTED_PROGRAM, STATE_DICT})
# What the training steps (prune, distill, finetune) take: every model format the worker turns into a
# trainable torch module (ONNX graphs converted, .pt2 programs lifted, TorchScript through ONNX).
TRAINABLE_FORMATS = ALL_MODEL_FORMATS
# A step's ``produces`` when its artifact keeps its input's format (an ONNX upload pruned stays ONNX).
SAME_AS_INPUT = "same_as_input"

# Deployment artifacts: made by the target steps, never uploaded, and the end of a chain
# (only the measuring steps take them; the next producing step starts from the same model).
TFLITE = "tflite"  # LiteRT flatbuffer (convert_tflite)
TENSORRT_ENGINE = "tensorrt_engine"  # serialized TensorRT engine for one GPU kind (build_tensorrt)
AOTI_PACKAGE = "aoti_package"  # AOTInductor-compiled .pt2 package (compile_gpu)
OPENVINO_IR = "openvino_ir"  # OpenVINO IR: a zip of model.xml + model.bin (convert_openvino)
DEPLOY_FORMATS = frozenset({TFLITE, TENSORRT_ENGINE, AOTI_PACKAGE, OPENVINO_IR})

# TensorFlow uploads: converted to TFLite only (by TensorFlow's own converter).
KERAS = "keras"  # Keras 3 .keras archive (config.json + weights)
SAVED_MODEL = "saved_model"  # a TensorFlow SavedModel directory, zipped
TF_FORMATS = frozenset({KERAS, SAVED_MODEL})

# What the measuring steps (benchmark, evaluate) take: everything.
MEASURABLE_FORMATS = ALL_MODEL_FORMATS | DEPLOY_FORMATS | TF_FORMATS

# What a step may need from the job, checked at POST /v1/jobs.
NEEDS_CALIBRATION = "calibration_dataset"
NEEDS_DATASET = "dataset"  # evaluation dataset, or the calibration one
