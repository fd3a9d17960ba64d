"""L-CAM-Fm and L-CAM-Img (Gkartzonika, Gkalelis & Mezaris, "Learning visual explanations for
DCNN-based image classifiers using an attention mechanism", ECCV Workshops 2022, arXiv 2209.11189).

A trainable attention mechanism (AM) on the last convolutional feature maps F (K, h, w) of a
*frozen* classifier produces one class activation map per class: a 1x1 convolution K -> C
(weights W, bias b) followed by a sigmoid, A = sigmoid(W * F + b); the AM has no other layer.
During training only the map of the ground-truth class c is used:
- L-CAM-Fm: A_c is multiplied into F and the rest of the frozen classifier ("tail") runs on it;
- L-CAM-Img: A_c is upsampled to the input size and multiplied into the pixel-space image, which
  the whole frozen classifier classifies.
Loss: L = l1 CE + l2 mean((A_c + eps) ** l4) + l3 TV(A_c), with l1..l4 = 1.5, 2, 0.01, 0.3 and
TV = squared neighbour differences plus a 0.3-weighted border term, divided by 2 * batch (the
``get_loss`` of the authors' release, bmezaris/L-CAM models/*_L_CAM_*.py; all configurable
through :class:`LossWeights`). One difference: the release indexes the maps with the label
vector (``maps[:, labels]``), so every image's loss terms also see the maps of the *other*
images' labels; here each image contributes only the map of its own label, as the paper
describes.

Inference (:class:`LCAMFm`, :class:`LCAMImg`) is ONE forward pass through the ClassifierHandle:
a forward hook captures F during ``model(images)`` and the map of the target class,
sigmoid(W_c . F + b_c), is computed from the captured features. (The authors' evaluation code
runs the backbone twice: once for F, once more for the masked input.)

Checkpoints are plain dicts of tensors, strings and numbers (``torch.load(weights_only=True)``)
recording the model name, layer, variant, class count, channel count and the training command.
Shipped heads live in ``plugins/assets/lcam-<variant>_<model>.pt`` (fp16 weights).

One job per module: ``head`` (the attention head, classifier tails, masked logits), ``loss``,
``checkpoint``, ``explainer`` (the two Explainer plugins), ``train`` (training steps, feature
caching) and ``cli`` (``xbench train lcam``). The names below are re-exported for scripts and
tests.
"""

from __future__ import annotations

from xbench import hookimpl
from xbench_plugins.lcam.checkpoint import (ASSETS, CHECKPOINT_FORMAT, HeadInfo, check_compatible,
                                            default_checkpoint, file_digest, load_checkpoint,
                                            save_checkpoint)
from xbench_plugins.lcam.explainer import LCAMFm, LCAMImg
from xbench_plugins.lcam.head import (AttentionHead, classifier_tail, layer_features,
                                      masked_logits_fm, masked_logits_img)
from xbench_plugins.lcam.loss import LossWeights, area_term, lcam_loss, total_variation
from xbench_plugins.lcam.train import (VARIANTS, StepStats, TrainConfig, augmented_view, batches,
                                       evaluate_masked_accuracy, freeze, make_optimizer,
                                       mean_stats, train_step)

__all__ = ["ASSETS", "CHECKPOINT_FORMAT", "VARIANTS", "AttentionHead", "HeadInfo", "LCAMFm",
           "LCAMImg", "LossWeights", "StepStats", "TrainConfig", "area_term", "augmented_view",
           "batches", "check_compatible", "classifier_tail", "default_checkpoint",
           "evaluate_masked_accuracy", "file_digest", "freeze", "layer_features", "lcam_loss",
           "load_checkpoint", "make_optimizer", "masked_logits_fm", "masked_logits_img",
           "mean_stats", "save_checkpoint", "total_variation", "train_step"]


@hookimpl
def register_explainers(register):
    register(LCAMFm)
    register(LCAMImg)


@hookimpl
def register_commands(register):
    register("train lcam", help="train an L-CAM attention head on a frozen classifier",
             configure="xbench_plugins.lcam.cli:add_arguments", run="xbench_plugins.lcam.cli:run")
