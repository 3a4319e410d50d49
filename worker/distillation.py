"""Recovery training shared by the distill and finetune passes: the student (the step's model) learns
to mimic the teacher (the job's original), so that a pruned or otherwise changed model gets back what
it lost. Any torch module trains here: a torchvision classifier rebuilt from a state_dict, or a graph
converted from ONNX or lifted from a .pt2, returning one tensor or several.

Classifiers: loss = alpha * KL(softmax(teacher/T) || softmax(student/T)) * T^2 + beta * CE(labels),
label-free (beta = 0) on the job's unlabeled images, or with the dataset's class labels; finetune is
alpha = 0. A classifier that ends in Softmax returns probabilities: their log is its logits (softening
them again would flatten the targets to nearly uniform).

Every other model (detectors, probability maps, several outputs) trains label-free: loss = alpha * the
sum over outputs of the squared difference to the teacher's output divided by the teacher's variance
per channel over the training images (at least 1e-3 of the channel's mean square), so that a YOLO
head's pixel boxes and 0..1 class scores weigh alike. Its validation is the mean over outputs of
1 - that normalised MSE ("output_agreement"); a detector's also says how often the student's best
class is the teacher's where the teacher sees an object. The teacher sees the same augmented batch
as the student.

A held-out part of the images picks the best epoch; progress is reported per epoch."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.errors import PassError
from core.formats import STATE_DICT
from core.steps.distill import DistillConfig
from worker.passes.base import ArtifactRef, PassContext, PassResult

TASKS = ("classification", "detection", "segmentation", "auto")
VALIDATION_BATCH = 256
# The training images are held in memory (in the model's input dtype); a set larger than this is cut
# short (a 640 x 640 detector's 20,000 default images would take 98 GB).
IMAGE_MEMORY_BYTES = 4 << 30
# The teacher's outputs on the held-out images are kept when they fit here, else recomputed per epoch.
CACHE_BYTES = 512 << 20
# How many training images set the per-channel scales of the dense loss.
STATS_IMAGES = 512
# A detector's anchors count for class agreement where the teacher's best class score is above this.
SCORE_THRESHOLD = 0.25
# Probabilities become logits by their log, floored where float32 underflowed to 0.
MIN_PROBABILITY = 1e-30
PROBE_IMAGES = 8


@dataclass
class _Images:
    """The training images held in memory, their class labels (None without), the held-out split,
    and where the image's height and width are (for the augmentation)."""

    x: Any  # torch.Tensor
    labels: Any  # torch.Tensor | None
    train_idx: Any
    val_idx: Any
    spatial_dims: tuple[int, int] | None
    capped: bool


def _outputs(result: Any) -> tuple:
    """A model's result as a flat tuple of tensors (a tensor, a tuple or list, a namedtuple, a dict)."""
    import torch

    if isinstance(result, torch.Tensor):
        return (result,)
    if isinstance(result, dict):
        result = tuple(result.values())
    if isinstance(result, (list, tuple)):
        return tuple(t for item in result for t in _outputs(item))
    raise PassError(f"the model returned {type(result).__name__}, not tensors", code="unsupported_model")


def _set_mode(model: Any, training: bool) -> None:
    """train() or eval(). A module that torch.export lifted refuses both: its mode is fixed in its
    graph (BatchNorm keeps its running statistics), and it trains as it is."""
    import torch

    if isinstance(model, torch.nn.Module):
        try:
            model.train(training)
        except NotImplementedError:
            pass


def _infer(model: Callable, x, device) -> tuple:
    """The model's outputs without gradients (no_grad, not inference_mode: they become loss targets)."""
    import torch

    with torch.no_grad():
        return _outputs(model(x.to(device)))


def _augment(x, generator, dims: tuple[int, int] | None):
    """Random horizontal flips and a shift of up to 2 pixels (rolled around the edge)."""
    import torch

    if dims is None:
        return x
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip.reshape(-1, *([1] * (x.ndim - 1))), x.flip(dims[1]), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    return torch.roll(x, shifts=(dy, dx), dims=dims)


def _read_images(ctx: PassContext, config: DistillConfig, step: str) -> _Images:
    """The calibration set read into memory (within IMAGE_MEMORY_BYTES), its class labels when it has
    them, and the held-out split."""
    import numpy as np
    import torch

    from core.datasets import model_layout
    from worker.data import NP_DTYPES, iter_batches

    dataset = ctx.calibration_dataset
    if dataset is None:
        raise PassError(f"{step} needs training images (calibration_dataset_id)", code="calibration_dataset_required")
    spec = ctx.input_spec[0]
    shape = [int(d) for d in spec["shape"]]
    per_image = int(np.prod(shape[1:])) * np.dtype(NP_DTYPES.get(spec.get("dtype", "float32"), np.float32)).itemsize
    limit = min(config.max_samples, max(IMAGE_MEMORY_BYTES // max(per_image, 1), 16))
    capped = limit < min(config.max_samples, dataset.num_samples)
    if capped:
        ctx.log.warning("%s: %d training images fit in memory, of %d", step, limit, dataset.num_samples)
    torch.manual_seed(config.seed)
    xs, ys = [], []
    for x, y in iter_batches(dataset, spec, ctx.preprocessing, batch_size=64, limit=limit):
        ctx.check_cancelled()
        xs.append(x)
        ys.append(y)
    if sum(len(x) for x in xs) < 3:
        raise PassError(f"{step} needs at least 3 training images", code="empty_dataset")
    x_all = torch.from_numpy(np.concatenate(xs))
    has_classes = dataset.labeled and dataset.label_type != "boxes" and all(y is not None for y in ys)
    labels = torch.from_numpy(np.concatenate(ys)) if has_classes else None
    n_val = max(1, int(len(x_all) * config.validation_fraction))
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(config.seed))
    layout = model_layout(shape)
    dims = {"NCHW": (-2, -1), "NHWC": (-3, -2)}.get(layout)
    return _Images(x_all, labels, order[n_val:], order[:n_val], dims, capped)


def _resolve_task(task: str, outputs: tuple) -> str:
    """The task as the context names it; for auto, one (N, C) output is a classifier, the rest dense."""
    if task not in TASKS:
        raise PassError(f"unknown task {task!r}", code="invalid_step_config")
    if task != "auto":
        return task
    return "classification" if len(outputs) == 1 and outputs[0].ndim == 2 else "dense"


# -- classification --------------------------------------------------------------------------------


def _class_scores(outputs: tuple):
    """A classifier's first output as (N, C): a (N, C, 1, 1) head flattened."""
    out = outputs[0]
    if out.ndim > 2 and all(d == 1 for d in out.shape[2:]):
        out = out.flatten(1)
    if out.ndim != 2:
        raise PassError(
            f"a classifier's output should be (N, classes), not {tuple(out.shape)}", code="unsupported_model"
        )
    return out


def _are_probabilities(scores) -> bool:
    """Softmax outputs: every row non-negative and summing to 1."""
    return bool((scores >= -1e-6).all()) and bool(((scores.double().sum(1) - 1).abs() < 1e-3).all())


def _to_logits(scores, probabilities: bool):
    import torch

    return torch.log(scores.clamp_min(MIN_PROBABILITY)) if probabilities else scores


class _Classification:
    """KL to the teacher's softened logits and/or CE on the labels; validated by accuracy on the labels,
    else by top-1 agreement with the teacher. The teacher's logits on every image are kept (N x C)."""

    def __init__(self, config: DistillConfig, images: _Images, teacher, student, device, step: str) -> None:
        import torch

        labels = images.labels
        self.beta = config.beta if config.beta is not None else (0.5 if labels is not None else 0.0)
        if self.beta > 0 and labels is None:
            raise PassError(f"{step} with beta > 0 needs a labeled dataset", code="labels_required")
        if config.alpha == 0 and self.beta == 0:
            raise PassError("alpha and beta are both 0: nothing to learn from", code="invalid_step_config")
        needs_teacher = config.alpha > 0 or labels is None
        if needs_teacher and teacher is None:
            raise PassError(f"{step} needs the original model as its teacher", code="invalid_step_config")
        self.config, self.images, self.teacher, self.device = config, images, teacher, device
        self.metric = "accuracy" if labels is not None else "top1_agreement_with_teacher"
        self.student_probabilities = _are_probabilities(_class_scores(_infer(student, images.x[:PROBE_IMAGES], device)))
        self.teacher_probabilities, self.soft = False, None
        if needs_teacher:
            x = images.x
            raw = torch.cat(
                [
                    _class_scores(_infer(teacher, x[i : i + VALIDATION_BATCH], device)).cpu()
                    for i in range(0, len(x), VALIDATION_BATCH)
                ]
            )
            self.teacher_probabilities = _are_probabilities(raw)
            self.soft = _to_logits(raw, self.teacher_probabilities)

    def loss(self, outputs: tuple, idx, x):
        import torch
        import torch.nn.functional as F

        config, T = self.config, self.config.temperature
        logits = _to_logits(_class_scores(outputs), self.student_probabilities)
        loss = torch.zeros((), device=self.device)
        if config.alpha > 0:
            if config.augmentation:
                target = _to_logits(_class_scores(_infer(self.teacher, x, self.device)), self.teacher_probabilities)
            else:
                target = self.soft[idx].to(self.device)
            kl = F.kl_div(F.log_softmax(logits / T, dim=1), F.softmax(target / T, dim=1), reduction="batchmean")
            loss = loss + config.alpha * kl * T * T
        if self.beta > 0:
            loss = loss + self.beta * F.cross_entropy(logits, self.images.labels[idx].to(self.device))
        return loss

    def validate(self, student) -> dict[str, Any]:
        import torch

        _set_mode(student, False)
        images, val_idx = self.images, self.images.val_idx
        pred = torch.cat(
            [
                _class_scores(_infer(student, images.x[val_idx[i : i + VALIDATION_BATCH]], self.device)).argmax(1).cpu()
                for i in range(0, len(val_idx), VALIDATION_BATCH)
            ]
        )
        target = images.labels[val_idx] if images.labels is not None else self.soft[val_idx].argmax(1)
        return {"validation": float((pred == target).float().mean())}

    def summary(self) -> dict[str, Any]:
        return {
            "validation_metric": self.metric,
            "beta": self.beta,
            "temperature": self.config.temperature,
            "teacher_outputs_probabilities": self.teacher_probabilities,
        }


# -- dense outputs (detectors, probability maps, several outputs) ----------------------------------


def _channel_scales(ctx: PassContext, teacher, images: _Images, batch_size: int, device) -> list:
    """Per output, the teacher's variance per channel (dim 1) over up to STATS_IMAGES training images,
    shaped to divide the output (None for an integer output)."""
    import torch

    idx = images.train_idx[:STATS_IMAGES]
    sums: list[list] = []
    for i in range(0, len(idx), batch_size):
        ctx.check_cancelled()
        outs = _infer(teacher, images.x[idx[i : i + batch_size]], device)
        if not sums:
            sums = [[0.0, 0.0, 0] for _ in outs]
        for acc, out in zip(sums, outs, strict=True):
            if out.is_floating_point():
                flat = (out.transpose(0, 1).flatten(1) if out.ndim >= 2 else out.reshape(1, -1)).double()
                acc[0] += flat.sum(1)
                acc[1] += flat.pow(2).sum(1)
                acc[2] += flat.shape[1]
    scales = []
    for (total, squares, count), out in zip(sums, outs, strict=True):
        if not out.is_floating_point():
            scales.append(None)
            continue
        mean, mean_square = total / count, squares / count
        # At least 1e-3 of the mean square: a channel that hardly varies over the images is measured
        # against its size instead, or its every wobble would outweigh the other outputs.
        variance = torch.maximum((mean_square - mean**2).clamp_min(0), 1e-3 * mean_square) + 1e-12
        shape = (1, -1, *([1] * (out.ndim - 2))) if out.ndim >= 2 else ()
        scales.append(variance.float().reshape(shape).to(device))
    return scales


def _class_score_output(outputs: tuple) -> int | None:
    """The first output laid out as a YOLOv8 head, (N, 4 + C, A) with rows 4: in 0..1, or None."""
    for k, out in enumerate(outputs):
        if out.is_floating_point() and out.ndim == 3 and 4 < out.shape[1] < out.shape[2]:
            scores = out[:, 4:]
            if float(scores.min()) >= 0 and float(scores.max()) <= 1:
                return k
    return None


def _class_agreement(student_out, teacher_out) -> tuple[int, int]:
    """(anchors where the student's best class is the teacher's, anchors counted): those where the
    teacher's best score passes SCORE_THRESHOLD."""
    best, cls = teacher_out[:, 4:].max(1)
    seen = best > SCORE_THRESHOLD
    return int((student_out[:, 4:].argmax(1) == cls)[seen].sum()), int(seen.sum())


class _Dense:
    """Normalised MSE to the teacher's outputs on the same (augmented) batch; validated by the mean over
    outputs of 1 - normalised MSE on the held-out images, and, for a detector with a YOLOv8 head, by
    class agreement."""

    metric = "output_agreement"

    def __init__(
        self,
        ctx: PassContext,
        config: DistillConfig,
        images: _Images,
        teacher,
        student,
        device,
        *,
        step: str,
        task: str,
        probe: tuple,
    ) -> None:
        if teacher is None or config.alpha == 0 or config.beta:
            raise PassError(
                f"{step} of a {task} model is label-free: it learns the original's outputs (alpha > 0, beta 0 or"
                " unset); class labels train classifiers only",
                code="invalid_step_config",
            )
        self.ctx, self.config, self.images, self.teacher, self.device = ctx, config, images, teacher, device
        self.batch_size = config.batch_size
        student_probe = _infer(student, images.x[:PROBE_IMAGES], device)
        if len(student_probe) < len(probe) or any(
            s.shape != t.shape for s, t in zip(student_probe, probe, strict=False)
        ):
            raise PassError(
                f"the model's outputs {[tuple(o.shape) for o in student_probe]} do not match the original's"
                f" {[tuple(o.shape) for o in probe]}",
                code="shape_mismatch",
            )
        self.scales = _channel_scales(ctx, teacher, images, self.batch_size, device)
        if not any(s is not None for s in self.scales):
            raise PassError("the model has no floating-point output to learn", code="unsupported_model")
        self.class_output = _class_score_output(probe) if task == "detection" else None
        if task == "detection" and self.class_output is None:
            ctx.log.info("%s: no (N, 4 + C, anchors) output with 0..1 scores, so no class agreement", step)
        per_image = sum(o.numel() * o.element_size() for o in probe) / len(probe[0])
        self.cache = self._teacher_batches() if per_image * len(images.val_idx) <= CACHE_BYTES else None

    def _val_batches(self):
        val_idx = self.images.val_idx
        return [self.images.x[val_idx[i : i + self.batch_size]] for i in range(0, len(val_idx), self.batch_size)]

    def _teacher_batches(self) -> list[tuple]:
        return [tuple(o.cpu() for o in _infer(self.teacher, x, self.device)) for x in self._val_batches()]

    def loss(self, outputs: tuple, idx, x):
        targets = _infer(self.teacher, x, self.device)
        # Not strict: in training mode a student may return extra (auxiliary) outputs after the teacher's.
        pairs = zip(outputs, targets, self.scales, strict=False)
        terms = [((s - t).pow(2) / scale).mean() for s, t, scale in pairs if scale is not None]
        return self.config.alpha * sum(terms)

    def validate(self, student) -> dict[str, Any]:
        import torch

        _set_mode(student, False)
        errors = [0.0] * len(self.scales)
        counts = [0] * len(self.scales)
        agree = seen = 0
        for b, x in enumerate(self._val_batches()):
            self.ctx.check_cancelled()
            outs = _infer(student, x, self.device)
            targets = self.cache[b] if self.cache is not None else _infer(self.teacher, x, self.device)
            targets = tuple(t.to(self.device) for t in targets)
            for k, scale in enumerate(self.scales):
                if scale is not None:
                    errors[k] += float(((outs[k] - targets[k]).pow(2) / scale).sum(dtype=torch.float64))
                    counts[k] += outs[k].numel()
            if self.class_output is not None:
                a, n = _class_agreement(outs[self.class_output], targets[self.class_output])
                agree, seen = agree + a, seen + n
        agreements = [1 - e / c for e, c, s in zip(errors, counts, self.scales, strict=True) if s is not None]
        result: dict[str, Any] = {"validation": sum(agreements) / len(agreements)}
        if len(agreements) > 1:
            result["output_agreements"] = agreements
        if self.class_output is not None:
            result["class_agreement"] = agree / seen if seen else None
        return result

    def summary(self) -> dict[str, Any]:
        return {"validation_metric": self.metric, "beta": 0.0, "outputs": len(self.scales)}


# -- the training loop -----------------------------------------------------------------------------


def _train_epoch(ctx: PassContext, student, optimizer, generator, images: _Images, objective, config, device) -> float:
    """One pass over the training images; the epoch's mean loss."""
    import torch

    _set_mode(student, True)
    perm = images.train_idx[torch.randperm(len(images.train_idx), generator=generator)]
    total_loss = 0.0
    for i in range(0, len(perm), config.batch_size):
        ctx.check_cancelled()
        idx = perm[i : i + config.batch_size]
        if len(idx) < 2:
            continue  # BatchNorm needs more than one sample
        x = images.x[idx]
        if config.augmentation:
            x = _augment(x, generator, images.spatial_dims)
        x = x.to(device)
        loss = objective.loss(_outputs(student(x)), idx, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(idx)
    return total_loss / max(len(perm), 1)


def _fit(ctx: PassContext, student, objective, images: _Images, config: DistillConfig, device, step: str):
    """AdamW with a cosine schedule over the epochs; (history, best epoch), the student left at its best
    epoch's weights (epoch 0: as it came)."""
    import torch

    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise PassError(f"{step}: the model has no trainable weights", code="unsupported_model")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = [{"epoch": 0, **objective.validate(student)}]
    best = (history[0]["validation"], copy.deepcopy(student.state_dict()), 0)
    for epoch in range(1, config.epochs + 1):
        loss = _train_epoch(ctx, student, optimizer, generator, images, objective, config, device)
        scheduler.step()
        scores = objective.validate(student)
        history.append({"epoch": epoch, "loss": loss, **scores})
        ctx.log.info("%s epoch %d: loss %.4f, validation %.4f", step, epoch, loss, scores["validation"])
        if scores["validation"] > best[0]:
            best = (scores["validation"], copy.deepcopy(student.state_dict()), epoch)
        ctx.report_progress(epoch / config.epochs)
    student.load_state_dict(best[1])
    return history, best[2]


def train_module(
    ctx: PassContext, student, teacher: Callable | None, config: DistillConfig, *, step: str, task: str
) -> tuple[Any, dict[str, Any]]:
    """``student`` (any torch module; trained in place) after training against ``teacher`` (a module or
    callable giving the original's outputs; None when only labels teach) and/or the labels, at its best
    epoch on the held-out images, on the CPU in eval mode; and the metrics. ``task``: classification,
    detection, segmentation or auto (a single (N, C) output is a classifier, anything else dense)."""
    import torch

    images = _read_images(ctx, config, step)
    # On a GPU worker, train there; the images stay on the CPU and move a batch at a time.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = student.to(device)
    _set_mode(student, False)
    if isinstance(teacher, torch.nn.Module):
        teacher.to(device)
        _set_mode(teacher, False)
    probe = _infer(teacher if teacher is not None else student, images.x[:PROBE_IMAGES], device)
    resolved = _resolve_task(task, probe)
    if resolved == "classification":
        objective = _Classification(config, images, teacher, student, device, step)
    else:
        objective = _Dense(ctx, config, images, teacher, student, device, step=step, task=resolved, probe=probe)
    history, best_epoch = _fit(ctx, student, objective, images, config, device, step)
    student = student.cpu()
    _set_mode(student, False)
    if isinstance(teacher, torch.nn.Module):
        teacher.cpu()
    metrics: dict[str, Any] = {"task": resolved, **objective.summary()}
    for key in history[0]:
        if key != "epoch":
            metrics[f"{key}_before"], metrics[f"{key}_best"] = history[0][key], history[best_epoch][key]
    metrics.update(
        best_epoch=best_epoch,
        epochs=history,
        train_samples=len(images.train_idx),
        validation_samples=len(images.val_idx),
        samples_capped_by_memory=images.capped,
        alpha=config.alpha,
        device=device.type,
    )
    return student, metrics


def train_student(ctx: PassContext, source: ArtifactRef, config: DistillConfig, *, step: str) -> PassResult:
    """The step's model, a state_dict of a torchvision architecture, trained against the job's original
    and/or the labels (train_module); the best epoch on the held-out images is kept."""
    from worker.torch_models import load_module, module_from_state_dict, save_module

    dataset = ctx.calibration_dataset
    has_classes = dataset is not None and dataset.labeled and dataset.label_type != "boxes"
    teacher = load_module(ctx.original) if config.alpha > 0 or not has_classes else None
    student, metrics = train_module(ctx, module_from_state_dict(source), teacher, config, step=step, task=ctx.task)
    out_path = ctx.work_dir / f"model.{step}.pt"
    save_module(student, out_path)
    return PassResult(artifact=out_path, format=STATE_DICT, meta=dict(source.meta), metrics=metrics)
