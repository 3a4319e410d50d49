"""Static INT8 quantization of ONNX graphs (worker.passes.quantize_int8 is the pass):

- graph: the graph ORT's quantizer can take (weights as initializers, opset 13 for per-channel).
- calibration: the calibration batches, streamed; a fixed-batch model's last batch padded.
- heads: mixed-scale detector heads that one INT8 scale cannot hold.
- quantizer: one prepared graph, calibrated once, quantized into any number of candidates.
- probe: the error each node's quantization adds by itself, to rank nodes for the fallback.
- gate: candidates judged on the task's metric (worker.metrics.tasks, the verdicts' own tallies),
  the per-layer fallback and the speed search.

Heavy libraries (onnx, onnxruntime) are imported inside functions: the API imports the pass."""
