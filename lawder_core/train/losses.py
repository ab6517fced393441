"""Segmentation losses: the MK-UNet/PraNet "structure loss", the multi-class loss, and their deep-supervision sum.

Binary (one output channel): the structure loss weights each pixel by `1 + 5·|avgpool_k(mask) − mask|`: pixels
near a boundary (where the k×k neighbourhood is mixed) count up to six times more, in both the BCE and the
soft-IoU term. k is 31 at 352 px, the size the loss was designed for, and scales with the training size
(`boundary_kernel`): a fixed 31 px window covers a quarter of a 128 px image and the weighting degenerates.
Several classes (background + one channel per class, softmax): cross-entropy + soft Dice over the
foreground classes, computed over the whole batch (nnU-Net's batch Dice: a class absent from one image does not
turn that image's Dice into noise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

BOUNDARY_KERNEL = 31  # at BOUNDARY_REFERENCE_SIZE
BOUNDARY_REFERENCE_SIZE = 352
BOUNDARY_GAIN = 5.0


def boundary_kernel(size: int | None) -> int:
    """The structure loss's pooling window for size×size training images: 31 px at 352 px, scaled, odd, ≥ 3."""
    if size is None:
        return BOUNDARY_KERNEL
    k = int(round(BOUNDARY_KERNEL * size / BOUNDARY_REFERENCE_SIZE))
    return max(3, k if k % 2 else k + 1)


def as_channel_target(target: torch.Tensor, channels: int) -> torch.Tensor:
    """(B,H,W) or (B,1,H,W) masks -> float (B,channels,H,W); integer labels are one-hot when channels > 1."""
    if target.dim() == 3:
        target = target.unsqueeze(1)
    if target.shape[1] == channels:
        return target.float()
    if target.shape[1] == 1 and channels > 1:
        labels = target[:, 0].long()
        return F.one_hot(labels, channels).permute(0, 3, 1, 2).float()
    raise ValueError(f"a target with {target.shape[1]} channels cannot supervise {channels} output channels")


def boundary_weight(target: torch.Tensor, kernel: int = BOUNDARY_KERNEL) -> torch.Tensor:
    local_mean = F.avg_pool2d(target, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return 1.0 + BOUNDARY_GAIN * (local_mean - target).abs()


def structure_loss(logits: torch.Tensor, target: torch.Tensor, kernel: int = BOUNDARY_KERNEL) -> torch.Tensor:
    """Boundary-weighted BCE + boundary-weighted soft IoU, averaged over images and channels."""
    target = as_channel_target(target, logits.shape[1])
    weight = boundary_weight(target, kernel)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    weighted_bce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    prob = torch.sigmoid(logits)
    intersection = (prob * target * weight).sum(dim=(2, 3))
    union = ((prob + target) * weight).sum(dim=(2, 3))
    weighted_iou = 1.0 - (intersection + 1.0) / (union - intersection + 1.0)
    return (weighted_bce + weighted_iou).mean()


def multiclass_loss(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 − soft Dice of the foreground classes); logits (B,C,H,W), classes (B,H,W) in [0, C)."""
    ce = F.cross_entropy(logits, classes)
    prob = logits.softmax(dim=1)[:, 1:]
    one_hot = F.one_hot(classes, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(prob.dtype)
    intersection = (prob * one_hot).sum(dim=(0, 2, 3))
    total = prob.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    soft_dice = (2 * intersection + 1.0) / (total + 1.0)
    return ce + (1.0 - soft_dice).mean()


def resize_classes(classes: torch.Tensor, size: tuple[int, int], num_classes: int | None = None) -> torch.Tensor:
    """(B,H,W) class indices at a coarser `size`: the class covering most of each output pixel's area.

    Give `num_classes` in a training step: without it the count is read from the data, a wait for the GPU."""
    if tuple(classes.shape[-2:]) == tuple(size):
        return classes
    count = num_classes if num_classes is not None else int(classes.max()) + 1
    one_hot = F.one_hot(classes, count).permute(0, 3, 1, 2).float()
    return F.interpolate(one_hot, size=size, mode="area").argmax(dim=1)


def resize_target(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-average a float target to `size`, then threshold at 0.5 so it stays a mask."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return (F.interpolate(target, size=size, mode="area") >= 0.5).float()


def segmentation_loss(
    logits: torch.Tensor,
    aux_list: Sequence[torch.Tensor],
    target: torch.Tensor,
    aux_weight: float | Sequence[float] = 0.0,
    kernel: int = BOUNDARY_KERNEL,
) -> torch.Tensor:
    """The main output's loss + `aux_weight` × the loss of each auxiliary output.

    One channel: structure loss on a float mask target (pooling window `kernel`, see `boundary_kernel`). Several
    channels with an integer class target (B,H,W): the multi-class loss (`multiclass_segmentation_loss`).
    Auxiliary outputs (deep-supervision heads, ORDER's region heads) may have any resolution and one or
    `logits.shape[1]` channels; the target is resized to each. `aux_weight` is one weight for all of them or one
    per auxiliary output. A weight of 0 still enters the sum (as 0 × its loss): every head then takes part in
    the backward pass, which DistributedDataParallel requires of every parameter.
    """
    channels = logits.shape[1]
    if channels > 1 and target.dtype in (torch.int64, torch.int32, torch.uint8):
        return multiclass_segmentation_loss(logits, aux_list, target.reshape(-1, *target.shape[-2:]).long(),
                                            aux_weights(aux_weight, aux_list), kernel)
    full = as_channel_target(target, channels)
    loss = structure_loss(logits, full, kernel)
    for aux, weight in zip(aux_list, aux_weights(aux_weight, aux_list), strict=True):
        aux_target = full if aux.shape[1] == channels else foreground(full)
        loss = loss + weight * structure_loss(aux, resize_target(aux_target, aux.shape[-2:]),
                                              scaled_kernel(kernel, aux, logits))
    return loss


def aux_weights(aux_weight: float | Sequence[float], aux_list: Sequence[torch.Tensor]) -> list[float]:
    weights = [aux_weight] * len(aux_list) if isinstance(aux_weight, (int, float)) else list(aux_weight)
    if len(weights) != len(aux_list):
        raise ValueError(f"{len(weights)} aux weights for {len(aux_list)} auxiliary outputs")
    return weights


def scaled_kernel(kernel: int, aux: torch.Tensor, logits: torch.Tensor) -> int:
    """The boundary window for a coarser auxiliary output: the same share of the image as `kernel` at full size."""
    return max(3, (kernel * aux.shape[-1] // max(1, logits.shape[-1])) | 1)


def multiclass_segmentation_loss(logits: torch.Tensor, aux_list: Sequence[torch.Tensor], classes: torch.Tensor,
                                 weights: Sequence[float], kernel: int = BOUNDARY_KERNEL) -> torch.Tensor:
    """Multi-class loss of the main logits + weighted losses of the auxiliary outputs at their resolution.

    An auxiliary output with the main output's channels gets the multi-class loss; a one-channel one (a binary
    region head) gets the structure loss on "any foreground class".
    """
    loss = multiclass_loss(logits, classes)
    for aux, weight in zip(aux_list, weights, strict=True):
        small = resize_classes(classes, aux.shape[-2:], logits.shape[1])
        if aux.shape[1] == logits.shape[1]:
            loss = loss + weight * multiclass_loss(aux, small)
        else:
            region = (small > 0).float().unsqueeze(1)
            loss = loss + weight * structure_loss(aux, region, scaled_kernel(kernel, aux, logits))
    return loss


def foreground(target: torch.Tensor) -> torch.Tensor:
    """Any-lesion map for one-channel auxiliary heads (ORDER's region heads) of a multi-class model."""
    if target.shape[1] == 1:
        return target
    return target[:, 1:].amax(dim=1, keepdim=True)
