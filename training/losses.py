"""The training losses of every task kind (see ``service.contract.TaskSpec``).

* binary, no condition (CTR):        BCE(sigmoid(logit_ctr), click) over all exposures
* binary with a condition (CVR):     ESMM: pCTCVR = pCTR * pCVR, BCE(pCTCVR, click & conversion)
                                     over ALL exposures, so pCVR is not fitted on the clicked
                                     sample only (Ma et al., SIGIR 2018)
* regression with a condition:       MSE on log1p(label) over the rows where the condition holds
                                     (watch time is only defined after a click)

Used by the trainer (:mod:`training.train`), the test metrics (:mod:`training.metrics`) and mutual
learning's global networks (:mod:`training.models.mutual`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from service.contract import TaskSpec

EPS = 1e-7  # the joint probability of ESMM is clamped to [EPS, 1 - EPS] before its BCE


def task_losses(out: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                tasks: list[TaskSpec]) -> dict[str, torch.Tensor]:
    """``{task: loss}`` from raw outputs (logits / log1p predictions) and labels by label name."""
    by_name = {t.name: t for t in tasks}
    losses = {}
    for t in tasks:
        y = labels[t.label]
        if t.kind == "binary" and t.condition is None:
            losses[t.name] = F.binary_cross_entropy_with_logits(out[t.name], y)
        elif t.kind == "binary":
            cond = by_name[t.condition]
            p_joint = torch.sigmoid(out[cond.name]) * torch.sigmoid(out[t.name])
            y_joint = labels[cond.label] * y
            losses[t.name] = F.binary_cross_entropy(p_joint.clamp(EPS, 1 - EPS), y_joint)
        else:
            target = torch.log1p(y.clamp(min=0))
            if t.condition is None:
                losses[t.name] = F.mse_loss(out[t.name], target)
            else:
                mask = labels[by_name[t.condition].label] > 0
                losses[t.name] = (F.mse_loss(out[t.name][mask], target[mask]) if mask.any()
                                  else out[t.name].sum() * 0.0)
    return losses
