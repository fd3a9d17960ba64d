"""Neuron similarity value (Wang Xinyuan, "Research on interpretability method of deep neural
network based on average image", master's thesis, Central South University, 2022).

docs/protocol.md "Neuron similarity value". For every class i, chosen layer j and neuron (channel) k:

- I_i: a class average image (:func:`simple_average`, :func:`confidence_averages`; the
  gradient-ascent :func:`network_driven_average` is a reference picture only, as in the thesis);
- GBP(I_i, j, k): guided backprop (Springenberg et al. 2015) of the spatial sum of channel k of
  layer j, computed for many channels per backward pass (:func:`channel_guided_backprop`);
- s_ijk = cos(GBP(I_i, j, k), I_i) (method 1) or cos(GBP(I_i, j, k), phi_i) with
  phi_i = GBP(I_i, output, class i) (method 2); a neuron whose visualisation is all zero has no
  similarity (NaN), and ``activated`` says whether its activation on I_i was ever positive;
- per-layer mean/std curves, and the pruning check: zero the ``ratio`` highest- and, separately,
  lowest-similarity neurons of one layer (no fine-tuning) and compare test accuracy (Table 5-1).

The model-scope Metric ``similarity-value`` (:class:`SimilarityValue`) is the per-image form
of the same quantity, for the regular run matrix: with the explained image x in place of the
class average image I_i and its target class in place of i, it scores the mean over the chosen
neurons of s_jk (method 1: cos(GBP(x, j, k), x); method 2: against GBP(x, output, target)).
It reads no explainer's map, so the runner computes it once per image (``kind = "model"``) and
only when asked for (``--metrics similarity-value``). The thesis's analysis proper (class
averages, curves, pruning) is the ``xbench similarity`` command; the embedded digits model is
registered as the Model ``digits-vgg``.

One job per module: ``digits`` (embedded data and model), ``averages`` (class average images),
``neurons`` (guided backprop of single neurons), ``analysis`` (similarities, curves),
``pruning``, ``plots``, ``metric`` and ``cli`` (``xbench similarity``). The names below are
re-exported for scripts and tests.
"""

from __future__ import annotations

from xbench import hookimpl
from xbench_plugins.similarity.analysis import (METHODS, NeuronVisuals, layer_curves,
                                                neuron_similarities)
from xbench_plugins.similarity.averages import (AVERAGE_KINDS, confidence_averages,
                                                network_driven_average, simple_average)
from xbench_plugins.similarity.digits import (DIGITS_ARCH, DIGITS_LAYERS, DIGITS_SEED, DIGITS_SIZE,
                                              SHIPPED_DIGITS_WEIGHTS, DigitsVGG, ImageSplit,
                                              build_digits_vgg, cache_dir, default_digits_weights,
                                              digits_checkpoint_path, digits_data,
                                              load_digits_checkpoint, save_digits_checkpoint,
                                              train_digits_vgg)
from xbench_plugins.similarity.metric import SimilarityValue, spread_channels
from xbench_plugins.similarity.neurons import (RELU_FAMILY, LayerInfo, channel_guided_backprop,
                                               class_guided_backprop, cosine_similarity,
                                               default_layers, guided_gradients, guided_relus,
                                               probe_layers, truncated_forward)
from xbench_plugins.similarity.plots import gbp_picture, plot_averages, plot_curves, plot_neurons
from xbench_plugins.similarity.pruning import accuracy, pruning_table, rank_neurons, zero_channels

__all__ = ["AVERAGE_KINDS", "DIGITS_ARCH", "DIGITS_LAYERS", "DIGITS_SEED", "DIGITS_SIZE",
           "DigitsVGG", "ImageSplit", "LayerInfo", "METHODS", "NeuronVisuals", "RELU_FAMILY",
           "SHIPPED_DIGITS_WEIGHTS", "SimilarityValue", "accuracy", "build_digits_vgg",
           "cache_dir", "channel_guided_backprop", "class_guided_backprop", "confidence_averages",
           "cosine_similarity", "default_digits_weights", "default_layers",
           "digits_checkpoint_path", "digits_data", "gbp_picture", "guided_gradients",
           "guided_relus", "layer_curves", "load_digits_checkpoint", "network_driven_average",
           "neuron_similarities", "plot_averages", "plot_curves", "plot_neurons", "probe_layers",
           "pruning_table", "rank_neurons", "save_digits_checkpoint", "simple_average",
           "spread_channels", "train_digits_vgg", "truncated_forward", "zero_channels"]


@hookimpl
def register_models(register):
    register(DigitsVGG)


@hookimpl
def register_metrics(register):
    register(SimilarityValue)


@hookimpl
def register_commands(register):
    register("similarity", help="neuron similarity values from class average images (Wang 2022)",
             configure="xbench_plugins.similarity.cli:add_arguments",
             run="xbench_plugins.similarity.cli:run")
