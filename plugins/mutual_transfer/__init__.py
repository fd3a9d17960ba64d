"""Mutual transfer of local attention maps (Cheng, Wang, Cui, Zhan, Computer Science 49(5):64-70, 2022).

Two students are trained at the same time: ST1 "with prior knowledge" (pretrained) and ST2.
After chosen blocks of each student the activation-based attention map F(A) = sum_c |A_c|^2
(eq. 1) is taken, the two maps of a paired layer are brought to a common size, split into k
local regions (a grid), and for every region the Pearson correlation of the two students'
maps (eq. 4) decides whether that region transfers (r > lambda) or is dropped so that it cannot
cause negative transfer. Each student's loss is

    L_i = CE(y, p_i) + beta/2 * sum_{layers j} sum_{kept regions r} || Q_i/||Q_i||_2 - Q_o/||Q_o||_2 ||_2

(eq. 5) where Q_o is the *other* student's local map. Global transfer (the paper's ablation,
every region kept) is the same code with lambda = -1.

No public implementation exists; this module is the reference one. Choices the paper text
available to us does not pin (only the abstract could be consulted), each one a named option:

- The other student's map in L_i is a constant target (``detach``), as in deep mutual learning
  and attention transfer, so L_i's gradient reaches student i only; both students step on
  L_1 + L_2 each batch (one backward pass, one optimizer).
- Paired maps of different sizes are brought to the smaller size by adaptive average pooling
  (area resampling; exact for integer ratios, e.g. EfficientNet-Lite1's 8x8 -> Lite0's 7x7).
- The k regions are a ``rows x cols`` grid (``--grid``, default 2x2) with near-equal integer
  boundaries (i*H//rows); the paper derives the region size from the layer's kernel size,
  which we leave to the user to express as a grid.
- Q/||Q||_2 is taken per region (the region is the "local attention map"), per image; the loss
  is the batch mean of the per-image sums. The mask is per image and per region.
- Pearson r of a constant region is undefined; we score it 0 (no evidence of agreement).
  lambda <= -1 keeps every region, including the measure-zero r = -1 case, so that lambda = -1
  is exactly global transfer.
- Transfer points: the three group outputs of the WRN-like ST1 and the three stage outputs of
  the MobileNet-like ST2 (32, 16 and 8 px on 32x32 inputs); for EfficientNet-Lite the last block
  of each of the three deepest resolutions (Lite0 ``_blocks.4/10/15``, Lite1 ``_blocks.6/14/20``).
  Paired in order, so resolutions agree up to Lite0/Lite1's 224 vs 240 px inputs.
- "Prior knowledge" of ST1: ImageNet weights for EfficientNet-Lite; a from-scratch small ST1
  first gets ``pretrain_epochs`` (default 2) of plain cross-entropy on the training data.
- Each student gets its own input size: images are read once at the larger student's
  resize/crop (same 0.875 crop ratio) and resized (bilinear, antialiased) for the other.
- Optimisation (not given in the abstract): SGD, Nesterov momentum 0.9, weight decay 5e-4,
  cosine-annealed per step; BatchNorm statistics optionally frozen for pretrained students.

Reproduce (``xbench train mutual-transfer --help``):
- digits Table-1 demo: ``xbench train mutual-transfer --data digits --compare --output DIR``
  (small-wrn + small-mobilenet; independent, global and local at lambda 0.5, 0.9, 0.99, 0.998
  (``--lambdas``), beta 1, grid 2x2, 3 epochs, batch 32, seed 0; held-out 540 digits,
  stratified split with fixed seed 0); ``python -m xbench_plugins.mutual_transfer.report
  DIR/table1.json PLOT.png`` draws kept fraction and top-1 against lambda;
- ImageNet scale: ``--st1 efficientnet-lite0 --st2 efficientnet-lite1 --data
  ../shared/data/imagenet_sample_1000 --val-data ../shared/data/ilsvrc2012_val_1000 --lr 0.001
  --batch-size 16 --freeze-bn --compare`` (with ``--limit`` / ``--val-limit`` on a shared CPU).

One job per module: ``losses`` (eqs. 1, 4, 5), ``students``, ``data``, ``trainer``,
``checkpoint``, ``model`` (the Model plugin), ``report`` (the sweep's statistics and plot) and
``cli`` (``xbench train mutual-transfer``). The names below are re-exported for scripts and tests.
"""

from __future__ import annotations

from xbench import hookimpl
from xbench_plugins.mutual_transfer.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                                                       MEMBERS, load_students, read_checkpoint,
                                                       restore_student, save_checkpoint)
from xbench_plugins.mutual_transfer.data import ImageSet
from xbench_plugins.mutual_transfer.losses import (TransferTerms, attention_map, match_size,
                                                   mutual_transfer_losses, normalized_distance,
                                                   parse_grid, pearson, region_correlations,
                                                   region_mask, region_slices, split_regions,
                                                   transfer_terms)
from xbench_plugins.mutual_transfer.model import MutualTransferModel
from xbench_plugins.mutual_transfer.students import (ARCHS, EFFICIENTNET_ARCHS, SMALL_ARCHS,
                                                     SMALL_INPUT, SMALL_MEAN, SMALL_STD,
                                                     SmallMobileNet, SmallWideResNet, Student,
                                                     build_student, capture_outputs,
                                                     efficientnet_stage_ends, student_forward)
from xbench_plugins.mutual_transfer.trainer import (R_QUANTILE_LEVELS, MutualTrainer, TrainConfig,
                                                    correct_predictions, correlation_summary,
                                                    epoch_batches, evaluate, make_optimizer,
                                                    mutual_step, pretrain, pretrain_step,
                                                    set_train_mode)

__all__ = ["ARCHS", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "EFFICIENTNET_ARCHS", "ImageSet",
           "MEMBERS", "MutualTrainer", "MutualTransferModel", "R_QUANTILE_LEVELS", "SMALL_ARCHS",
           "SMALL_INPUT", "SMALL_MEAN", "SMALL_STD", "SmallMobileNet", "SmallWideResNet",
           "Student", "TrainConfig", "TransferTerms", "attention_map", "build_student",
           "capture_outputs", "correct_predictions", "correlation_summary",
           "efficientnet_stage_ends", "epoch_batches", "evaluate", "load_students",
           "make_optimizer", "match_size", "mutual_step", "mutual_transfer_losses",
           "normalized_distance", "parse_grid", "pearson", "pretrain", "pretrain_step",
           "read_checkpoint", "region_correlations", "region_mask", "region_slices",
           "restore_student", "save_checkpoint", "set_train_mode", "split_regions",
           "student_forward", "transfer_terms"]


@hookimpl
def register_models(register):
    register(MutualTransferModel)


@hookimpl
def register_commands(register):
    register("train mutual-transfer",
             help="train two students with local attention map mutual transfer",
             configure="xbench_plugins.mutual_transfer.cli:add_arguments",
             run="xbench_plugins.mutual_transfer.cli:run")
