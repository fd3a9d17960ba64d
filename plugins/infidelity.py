"""Infidelity (Yeh et al., "On the (in)fidelity and sensitivity of explanations", NeurIPS 2019,
Def. 2.1), computed by ``captum.metrics.infidelity``:

    INFD(Phi, f, x) = E_I [ (I . Phi(x) - (f(x) - f(x - I)))^2 ],

f the target's softmax probability (``output=probability``) or logit, I Gaussian noise of std
``noise_std`` in pixel space (Yeh's "noisy baseline" perturbation), E over ``samples`` draws.
The map (one value per pixel) is given to captum repeated over the three channels, so
I . Phi = sum_pixels Phi_p (sum_channels I_cp). ``normalize=True`` (captum's option, Yeh's
Eq. 3 with the optimal scale beta): the harness's maps are min-max normalised, so their scale
means nothing; beta removes it. Lower is better; a map that explains a linear model's logit
exactly (Phi proportional to its weights) scores 0.

The ``samples`` noise tensors (3, H, W) come from a generator seeded with ``seed`` and are
shared by every image (an image's score never depends on its batch). Quantus's ``Infidelity``
perturbs square patches to a baseline instead (a different perturbation distribution, shown in
tests). Opt-in (``--metrics infidelity``): ``samples`` forwards per image and map.
"""

from __future__ import annotations

import torch

import xbench
from xbench import Metric, MetricBatch, hookimpl

OUTPUTS = ("probability", "logit")


def noise_perturbation(noise: torch.Tensor, images: int):
    """captum perturb_func replaying ``noise`` (N, 3, H, W): captum repeats each input N times
    (repeat_interleave), possibly in chunks of fewer samples; returns (I, x - I)."""
    used = {"offset": 0}

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        current = inputs.shape[0] // images
        start = used["offset"] % noise.shape[0]
        chunk = noise[start:start + current]
        used["offset"] += current
        perturbation = chunk.repeat(images, 1, 1, 1).to(inputs.dtype)
        return perturbation, inputs - perturbation

    return perturb


def forward_of(model, output: str):
    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = model.predict(x).float()
        return logits.softmax(dim=1) if output == "probability" else logits
    return forward


class Infidelity(Metric):
    name = "infidelity"
    direction = "lower"
    family = "faithfulness"
    unit = "MSE"
    library = "captum"
    opt_in = True
    summary = "infidelity (Yeh 2019, captum): E[(I.Phi - output drop)^2] under Gaussian noise"

    class Options(xbench.Options):
        noise_std: float = xbench.option(0.1, "std of the Gaussian perturbation, pixel units",
                                         above=0.0)
        samples: int = xbench.option(32, "perturbations (forwards) per image", minimum=1)
        output: str = xbench.option("probability", "f: the target's softmax probability or "
                                                   "logit", choices=OUTPUTS)
        seed: int = xbench.option(0, "seed of the perturbations")

    profiles = {"quick": {"samples": 8}}

    @classmethod
    def expected_passes(cls, options, facts):
        return xbench.Passes(1 + options.samples)  # captum reads f(x) once, then each sample

    def score(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        from captum.metrics import infidelity

        o = self.options
        images = batch.images
        generator = torch.Generator().manual_seed(o.seed)
        noise = (torch.randn((o.samples, *images.shape[1:]), generator=generator)
                 * o.noise_std).to(images.device)
        attributions = batch.saliency[:, None].expand_as(images).to(images.dtype)
        values = infidelity(forward_of(batch.model, o.output),
                            noise_perturbation(noise, images.shape[0]), images, attributions,
                            target=batch.targets, n_perturb_samples=o.samples, normalize=True)
        return {"": values.float()}


@hookimpl
def register_metrics(register):
    register(Infidelity)
