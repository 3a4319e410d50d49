"""Recovery training shared by the distill and finetune passes: the student (the step's input)
mimics the teacher (the job's original model):
loss = alpha * KL(softmax(teacher/T) || softmax(student/T)) * T^2 + beta * CE(labels).
It works label-free (beta = 0) on the job's unlabeled images, and uses labels when the
dataset has them; finetune is alpha = 0. A held-out part of the images picks the best epoch;
progress is reported per epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.errors import PassError
from core.formats import STATE_DICT
from core.steps.distill import DistillConfig
from worker.passes.base import ArtifactRef, PassContext, PassResult

VALIDATION_BATCH = 256


@dataclass
class _Images:
    """The training images held in memory, their labels (None without), and the split."""

    x: Any  # torch.Tensor
    labels: Any  # torch.Tensor | None
    beta: float
    train_idx: Any
    val_idx: Any


def _augment(x, generator):
    import torch

    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def _read_images(ctx: PassContext, config: DistillConfig, step: str) -> _Images:
    """The calibration set read into memory, the labels' weight decided, and the held-out split."""
    import numpy as np
    import torch

    from worker.data import iter_batches

    dataset = ctx.calibration_dataset
    if dataset is None:
        raise PassError(f"{step} needs training images (calibration_dataset_id)", code="calibration_dataset_required")
    torch.manual_seed(config.seed)
    xs, ys = [], []
    for x, y in iter_batches(dataset, ctx.input_spec[0], ctx.preprocessing, batch_size=256, limit=config.max_samples):
        xs.append(x)
        ys.append(y)
    x_all = torch.from_numpy(np.concatenate(xs))
    labels = torch.from_numpy(np.concatenate(ys)) if dataset.labeled and all(y is not None for y in ys) else None
    beta = config.beta if config.beta is not None else (0.5 if labels is not None else 0.0)
    if beta > 0 and labels is None:
        raise PassError(f"{step} with beta > 0 needs a labeled dataset", code="labels_required")
    if config.alpha == 0 and beta == 0:
        raise PassError("alpha and beta are both 0: nothing to learn from", code="invalid_step_config")
    n_val = max(1, int(len(x_all) * config.validation_fraction))
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(config.seed))
    return _Images(x=x_all, labels=labels, beta=beta, train_idx=order[n_val:], val_idx=order[:n_val])


def _teacher(ctx: PassContext, config: DistillConfig, images: _Images, device):
    """(teacher module or None, its outputs on every image or None): needed for the soft targets, and
    as the validation target when there are no labels."""
    import torch

    from worker.torch_models import load_module

    if not (config.alpha > 0 or images.labels is None):
        return None, None
    teacher = load_module(ctx.original)
    if device.type == "cuda" and isinstance(teacher, torch.nn.Module):
        teacher = teacher.to(device)
    x = images.x
    with torch.inference_mode():
        soft = torch.cat([teacher(x[i : i + 256].to(device)).cpu() for i in range(0, len(x), 256)])
    return teacher, soft


def _validate(student, images: _Images, soft, device) -> float:
    """Accuracy on the held-out images (against the labels, else the teacher's top-1)."""
    import torch

    student.eval()
    val_idx = images.val_idx
    with torch.inference_mode():
        pred = torch.cat(
            [
                student(images.x[val_idx[i : i + VALIDATION_BATCH]].to(device)).cpu()
                for i in range(0, len(val_idx), VALIDATION_BATCH)
            ]
        ).argmax(1)
    target = images.labels[val_idx] if images.labels is not None else soft[val_idx].argmax(1)
    return float((pred == target).float().mean())


def _batch_loss(out, idx, x, images: _Images, teacher, soft, config: DistillConfig, device):
    import torch
    import torch.nn.functional as F

    T = config.temperature
    loss = torch.zeros((), device=device)
    if config.alpha > 0:
        with torch.no_grad():
            t_out = teacher(x) if config.augmentation else soft[idx].to(device)
        kl = F.kl_div(F.log_softmax(out / T, dim=1), F.softmax(t_out / T, dim=1), reduction="batchmean")
        loss = loss + config.alpha * kl * T * T
    if images.beta > 0:
        loss = loss + images.beta * F.cross_entropy(out, images.labels[idx].to(device))
    return loss


def _train_epoch(ctx, student, optimizer, generator, images: _Images, teacher, soft, config, device) -> float:
    """One pass over the training images; the epoch's mean loss."""
    import torch

    student.train()
    perm = images.train_idx[torch.randperm(len(images.train_idx), generator=generator)]
    total_loss = 0.0
    for i in range(0, len(perm), config.batch_size):
        ctx.check_cancelled()
        idx = perm[i : i + config.batch_size]
        if len(idx) < 2:
            continue  # BatchNorm needs more than one sample
        x = images.x[idx]
        if config.augmentation:
            x = _augment(x, generator)
        x = x.to(device)
        loss = _batch_loss(student(x), idx, x, images, teacher, soft, config, device)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(idx)
    return total_loss / max(len(perm), 1)


def train_student(ctx: PassContext, source: ArtifactRef, config: DistillConfig, *, step: str) -> PassResult:
    """The step's model trained against the teacher and/or the labels; the best epoch on the
    held-out images is kept."""
    import copy

    import torch

    from worker.torch_models import module_from_state_dict, save_module

    images = _read_images(ctx, config, step)
    # On a GPU worker, train there; the images stay on the CPU and move a batch at a time.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, soft = _teacher(ctx, config, images, device)
    student = module_from_state_dict(source).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    generator = torch.Generator().manual_seed(config.seed)

    history: list[dict[str, Any]] = [{"epoch": 0, "validation": _validate(student, images, soft, device)}]
    best = (history[0]["validation"], copy.deepcopy(student.state_dict()), 0)
    for epoch in range(1, config.epochs + 1):
        loss = _train_epoch(ctx, student, optimizer, generator, images, teacher, soft, config, device)
        scheduler.step()
        score = _validate(student, images, soft, device)
        history.append({"epoch": epoch, "loss": loss, "validation": score})
        ctx.log.info("%s epoch %d: loss %.4f, validation %.4f", step, epoch, loss, score)
        if score > best[0]:
            best = (score, copy.deepcopy(student.state_dict()), epoch)
        ctx.report_progress(epoch / config.epochs)
    student.load_state_dict(best[1])
    out_path = ctx.work_dir / f"model.{step}.pt"
    save_module(student.cpu().eval(), out_path)
    return PassResult(
        artifact=out_path,
        format=STATE_DICT,
        meta=dict(source.meta),
        metrics={
            "validation_metric": "accuracy" if images.labels is not None else "top1_agreement_with_teacher",
            "validation_before": history[0]["validation"],
            "validation_best": best[0],
            "best_epoch": best[2],
            "epochs": history,
            "train_samples": len(images.train_idx),
            "validation_samples": len(images.val_idx),
            "alpha": config.alpha,
            "beta": images.beta,
            "temperature": config.temperature,
            "device": device.type,
        },
    )
