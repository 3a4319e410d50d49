"""Task metrics on model outputs, in numpy (no runtime imports): fidelity (SNR, cosine), detection
(decode, NMS, agreement, mAP, a raw head's channel SNR) and the per-task tallies (tasks) that the
evaluate pass reports and the INT8 gate judges with."""
