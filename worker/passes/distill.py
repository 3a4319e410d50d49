"""distill / finetune: recover a pruned (or otherwise changed) model by training it.

distill: the student (the step's input) mimics the teacher (the job's original model):
loss = alpha * KL(softmax(teacher/T) || softmax(student/T)) * T^2 + beta * CE(labels).
It works label-free (beta = 0) on the job's unlabeled images, and uses labels when the
dataset has them. finetune is plain supervised recovery (alpha = 0), for comparison.
A held-out part of the images picks the best epoch; progress is reported per epoch.
"""

from __future__ import annotations

from pydantic import Field

from core.errors import PassError
from worker.passes.base import (
    NEEDS_CALIBRATION,
    STATE_DICT,
    ArtifactRef,
    Pass,
    PassConfig,
    PassContext,
    PassResult,
)


class DistillConfig(PassConfig):
    alpha: float = Field(default=1.0, ge=0, description="Weight of the teacher's soft targets.")
    beta: float | None = Field(
        default=None, ge=0, description="Weight of the labels' CE; default 0.5 with labels, 0 without."
    )
    temperature: float = Field(default=4.0, gt=0)
    epochs: int = Field(default=5, ge=1, le=500)
    learning_rate: float = Field(default=1e-3, gt=0, le=1)
    batch_size: int = Field(default=32, ge=1, le=1024)
    augmentation: bool = Field(default=True, description="Random horizontal flips and small shifts.")
    validation_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    max_samples: int = Field(default=20_000, ge=16, le=1_000_000, description="Training images read into memory.")
    seed: int = 0


def _augment(x, generator):
    import torch

    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


class Distill(Pass):
    name = "distill"
    version = 1
    description = "Knowledge distillation from the original model (label-free, or with labels)."
    Config = DistillConfig
    accepts = frozenset({STATE_DICT})
    produces = STATE_DICT
    needs = frozenset({NEEDS_CALIBRATION})

    def run(self, ctx: PassContext, source: ArtifactRef, config: DistillConfig) -> PassResult:
        import copy

        import numpy as np
        import torch
        import torch.nn.functional as F

        from worker.data import iter_batches
        from worker.torch_models import load_module, module_from_state_dict, save_module

        dataset = ctx.calibration_dataset
        if dataset is None:
            raise PassError(
                f"{self.name} needs training images (calibration_dataset_id)", code="calibration_dataset_required"
            )
        torch.manual_seed(config.seed)
        xs, ys = [], []
        for x, y in iter_batches(
            dataset, ctx.input_spec[0], ctx.preprocessing, batch_size=256, limit=config.max_samples
        ):
            xs.append(x)
            ys.append(y)
        x_all = torch.from_numpy(np.concatenate(xs))
        labels = torch.from_numpy(np.concatenate(ys)) if dataset.labeled and all(y is not None for y in ys) else None
        beta = config.beta if config.beta is not None else (0.5 if labels is not None else 0.0)
        if beta > 0 and labels is None:
            raise PassError(f"{self.name} with beta > 0 needs a labeled dataset", code="labels_required")
        if config.alpha == 0 and beta == 0:
            raise PassError("alpha and beta are both 0: nothing to learn from", code="invalid_step_config")

        n_val = max(1, int(len(x_all) * config.validation_fraction))
        order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(config.seed))
        val_idx, train_idx = order[:n_val], order[n_val:]
        # On a GPU worker, train there; the images stay on the CPU and move a batch at a time.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        teacher = load_module(ctx.original) if config.alpha > 0 or labels is None else None
        if teacher is not None and device.type == "cuda" and isinstance(teacher, torch.nn.Module):
            teacher = teacher.to(device)
        with torch.inference_mode():
            soft = (
                torch.cat([teacher(x_all[i : i + 256].to(device)).cpu() for i in range(0, len(x_all), 256)])
                if teacher is not None
                else None
            )
        student = module_from_state_dict(source).to(device)
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
        generator = torch.Generator().manual_seed(config.seed)
        T = config.temperature

        def validate() -> float:
            student.eval()
            with torch.inference_mode():
                pred = torch.cat(
                    [student(x_all[val_idx[i : i + 256]].to(device)).cpu() for i in range(0, n_val, 256)]
                ).argmax(1)
            target = labels[val_idx] if labels is not None else soft[val_idx].argmax(1)
            return float((pred == target).float().mean())

        history = [{"epoch": 0, "validation": validate()}]
        best = (history[0]["validation"], copy.deepcopy(student.state_dict()), 0)
        for epoch in range(1, config.epochs + 1):
            student.train()
            perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
            total_loss = 0.0
            for i in range(0, len(perm), config.batch_size):
                ctx.check_cancelled()
                idx = perm[i : i + config.batch_size]
                if len(idx) < 2:
                    continue  # BatchNorm needs more than one sample
                x = x_all[idx]
                if config.augmentation:
                    x = _augment(x, generator)
                x = x.to(device)
                out = student(x)
                loss = torch.zeros((), device=device)
                if config.alpha > 0:
                    with torch.no_grad():
                        t_out = teacher(x) if config.augmentation else soft[idx].to(device)
                    loss = (
                        loss
                        + config.alpha
                        * F.kl_div(F.log_softmax(out / T, dim=1), F.softmax(t_out / T, dim=1), reduction="batchmean")
                        * T
                        * T
                    )
                if beta > 0:
                    loss = loss + beta * F.cross_entropy(out, labels[idx].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach()) * len(idx)
            scheduler.step()
            score = validate()
            history.append({"epoch": epoch, "loss": total_loss / max(len(perm), 1), "validation": score})
            ctx.log.info("%s epoch %d: loss %.4f, validation %.4f", self.name, epoch, history[-1]["loss"], score)
            if score > best[0]:
                best = (score, copy.deepcopy(student.state_dict()), epoch)
            ctx.report_progress(epoch / config.epochs)
        student.load_state_dict(best[1])
        student = student.cpu().eval()
        out_path = ctx.work_dir / f"model.{self.name}.pt"
        save_module(student, out_path)
        return PassResult(
            artifact=out_path,
            format=STATE_DICT,
            meta=dict(source.meta),
            metrics={
                "validation_metric": "accuracy" if labels is not None else "top1_agreement_with_teacher",
                "validation_before": history[0]["validation"],
                "validation_best": best[0],
                "best_epoch": best[2],
                "epochs": history,
                "train_samples": len(train_idx),
                "validation_samples": n_val,
                "alpha": config.alpha,
                "beta": beta,
                "temperature": T,
                "device": device.type,
            },
        )
