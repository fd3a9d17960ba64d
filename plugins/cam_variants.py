"""CAM variants of pytorch-grad-cam (Gildenblat et al., PyPI ``grad-cam``), implemented natively.

Why native: each is a few lines on the target layer's activations A (B, K, h, w) and
gradients G = dy^c/dA (y^c the pre-softmax target score), which
:func:`xbench_plugins.gradcam.target_layer_gradients` already gives in one forward and one
backward pass; so they need no extra dependency at run time, work on any ``--layer``, and sit
next to the existing CAMs. pytorch-grad-cam is their test oracle (tests/test_cam_variants.py).

- ``xgradcam`` (Fu et al., BMVC 2020, "Axiom-based Grad-CAM"): w_k = sum_ij A^k_ij G^k_ij /
  (sum_ij A^k_ij + eps), L = ReLU(sum_k w_k A^k). ``eps`` = 1e-7 as pytorch-grad-cam (a
  declared option; the paper has none: a channel with sum A = 0 then has w_k = 0 instead of
  0/0). 1 F + 1 B.
- ``hirescam`` (Draelos & Carin, 2020): L = ReLU(sum_k G^k * A^k), element-wise. 1 F + 1 B.
- ``gradcam-elementwise`` (pytorch-grad-cam's GradCAMElementWise): L = sum_k ReLU(G^k * A^k)
  (the outer ReLU of the peer is then a no-op). 1 F + 1 B.
- ``eigencam`` (Muhammad & Yeasin, IJCNN 2020): the projection of the centred activations on
  their first principal component, L = ReLU(s (X - mean X) v_1) with X the (h w, K) matrix of
  A, v_1 its first right singular vector. 1 F + 0 B (class-agnostic).
- ``eigengradcam`` (pytorch-grad-cam's EigenGradCAM): the same on G * A. 1 F + 1 B.

- ``ablation-cam`` (Desai & Ramaswamy, WACV 2020): w_k = (y^c - y^c_k) / y^c with y^c_k the
  score when channel k of the layer is set to 0, L = ReLU(sum_k w_k A^k). 1 + K forwards per
  image (K channels), eager: the ablation happens inside the network, so the copies cannot go
  through ``model.predict`` (the engine runs the whole network without hooks); they are
  batched ``batch_size`` channels at a time. pytorch-grad-cam's AblationCAM sets the channel
  to 0 only where the layer's minimum is 0 (post-ReLU layers, where the two agree) and to
  ``min - 1e7`` elsewhere; here it is always 0, as the paper. Where y^c = 0 the weights are 0.

The sign s of a singular vector is arbitrary (LAPACK returns either), and pytorch-grad-cam's
EigenCAM keeps whatever numpy's SVD returns, so its map can come out as the *negative* of the
component, whose ReLU then highlights the other side of the image. The sign rule is a declared
option: ``max-abs`` (default; Chung & Ying, Appl. Sci. 2025, "Seg-Eigen-CAM" eq. 13, which
pytorch-grad-cam ships as ``get_2d_projection_with_sign_correction``: flip when
|min| > |max|) or ``activation`` (flip when the projection correlates negatively with the
channel-mean activation, i.e. the component points where the layer is active).
"""

from __future__ import annotations

import numpy as np
import torch

import xbench
from xbench import Explainer, capture_activations, hookimpl, masked_batch_size
from xbench_plugins.controls import image_seed
from xbench_plugins.gradcam import target_layer_gradients


def xgradcam_map(activation: torch.Tensor, gradient: torch.Tensor, eps: float) -> torch.Tensor:
    weights = (activation * gradient).sum(dim=(2, 3), keepdim=True) / (
        activation.sum(dim=(2, 3), keepdim=True) + eps)
    return torch.relu((weights * activation).sum(dim=1))


def eigen_projection(features: torch.Tensor, sign: str = "max-abs",
                     activation: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, h, w) -> (B, h, w): centred features projected on their first principal
    component, sign fixed by ``sign`` (``activation`` needs the layer's activations)."""
    batch, channels, height, width = features.shape
    x = features.detach().float().nan_to_num(0.0).reshape(batch, channels, -1).transpose(1, 2)
    x = x - x.mean(dim=1, keepdim=True)  # centre each channel over the h w positions
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    projection = (x @ vh[:, 0, :, None])[..., 0]  # (B, h w)
    if sign == "max-abs":
        flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
    elif sign == "activation":
        reference = activation.detach().float().mean(dim=1).reshape(batch, -1)
        reference = reference - reference.mean(dim=1, keepdim=True)
        flip = (projection * reference).sum(dim=1) < 0
    else:
        raise ValueError(f"unknown sign rule {sign!r}; choose max-abs or activation")
    projection = torch.where(flip[:, None], -projection, projection)
    return projection.view(batch, height, width)


class _CAMVariant(Explainer):
    needs_gradients = True
    library = "xbench"
    passes = xbench.Passes(1, 1)


class XGradCAM(_CAMVariant):
    """L = ReLU(sum_k w_k A^k), w_k = sum_ij A^k_ij G^k_ij / (sum_ij A^k_ij + eps)
    (Fu et al. 2020); 1 F + 1 B."""

    name = "xgradcam"
    summary = "XGrad-CAM: activation-weighted gradients as channel weights (1 F + 1 B)"

    class Options(xbench.Options):
        eps: float = xbench.option(1e-7, "added to sum_ij A^k_ij (pytorch-grad-cam's value)",
                                   minimum=0.0)

    def explain(self, model, images, targets):
        activation, gradient, _ = target_layer_gradients(model, self.layer, images, targets)
        return xgradcam_map(activation, gradient, self.options.eps)


class HiResCAM(_CAMVariant):
    """L = ReLU(sum_k G^k * A^k) (Draelos & Carin 2020); 1 F + 1 B."""

    name = "hirescam"
    summary = "HiResCAM: element-wise gradient x activation, summed over channels (1 F + 1 B)"

    def explain(self, model, images, targets):
        activation, gradient, _ = target_layer_gradients(model, self.layer, images, targets)
        return torch.relu((gradient * activation).sum(dim=1))


class GradCAMElementWise(_CAMVariant):
    """L = sum_k ReLU(G^k * A^k) (pytorch-grad-cam's GradCAMElementWise); 1 F + 1 B."""

    name = "gradcam-elementwise"
    summary = "Grad-CAM element-wise: positive parts of gradient x activation summed (1 F + 1 B)"

    def explain(self, model, images, targets):
        activation, gradient, _ = target_layer_gradients(model, self.layer, images, targets)
        return torch.relu(gradient * activation).sum(dim=1)


class EigenOptions(xbench.Options):
    sign: str = xbench.option("max-abs", "sign of the principal component: flip when |min| > "
                              "|max| (Seg-Eigen-CAM eq. 13), or to correlate with the mean "
                              "activation", choices=("max-abs", "activation"))


class EigenCAM(_CAMVariant):
    """L = ReLU(s (X - mean X) v_1), X the (hw, K) activations, v_1 their first principal
    direction (Muhammad & Yeasin 2020); 1 F + 0 B, class-agnostic."""

    name = "eigencam"
    needs_gradients = False
    summary = "EigenCAM: first principal component of the activations, class-agnostic (1 F)"
    passes = xbench.Passes(1)
    Options = EigenOptions

    def explain(self, model, images, targets):
        with capture_activations(model.layer(self.layer), keep_grad=False,
                                 name=self.layer) as store:
            model(images)
        activation = store["activation"].detach()
        return torch.relu(eigen_projection(activation, self.options.sign, activation))


class EigenGradCAM(_CAMVariant):
    """L = ReLU(s (X - mean X) v_1), X the (hw, K) matrix of G * A (pytorch-grad-cam's
    EigenGradCAM); 1 F + 1 B."""

    name = "eigengradcam"
    summary = "EigenGradCAM: first principal component of gradient x activation (1 F + 1 B)"
    Options = EigenOptions

    def explain(self, model, images, targets):
        activation, gradient, _ = target_layer_gradients(model, self.layer, images, targets)
        return torch.relu(eigen_projection(gradient * activation, self.options.sign, activation))


class AblationCAM(_CAMVariant):
    """L = ReLU(sum_k w_k A^k), w_k = (y^c - y^c_k) / y^c, y^c_k with channel k zeroed
    (Desai & Ramaswamy 2020); 1 + K forwards, 0 backward (1 + max_channels with that option:
    the channels of largest mean activation are ablated, the others weigh 0)."""

    name = "ablation-cam"
    needs_gradients = False
    summary = "Ablation-CAM: score drop when each channel is zeroed as its weight (1 + K forwards)"

    class Options(xbench.Options):
        max_channels: int | None = xbench.option(
            None, "ablate only this many channels of largest mean activation per image "
                  "(the others weigh 0); default: all K", minimum=1)
        batch_size: int | None = xbench.option(
            None, "ablated copies per forward pass (default: by device)", minimum=1,
            in_variant=False)

    # every ablated copy is an eager forward of the whole network (the ablation happens
    # inside it, so the hook-free engine cannot run it): 1281 per image at EfficientNet-Lite0's
    # default layer; the quick profile ablates the 128 most active channels (as Score-CAM's)
    profiles = {"quick": {"max_channels": 128}}

    @classmethod
    def expected_passes(cls, options, facts):
        if facts.channels is None:
            return None
        return xbench.Passes(1 + min(options.max_channels or facts.channels, facts.channels))

    def explain(self, model, images, targets):
        module = model.layer(self.layer)
        with capture_activations(module, keep_grad=False, name=self.layer) as store:
            logits = model(images)
        activation = store["activation"].detach()
        score = logits.detach().gather(1, targets[:, None])[:, 0].float()  # y^c
        batch, channels = activation.shape[:2]
        ablated = score[:, None].repeat(1, channels)  # channels not ablated: weight 0
        chunk = self.options.batch_size or masked_batch_size(images.device)
        limit = min(self.options.max_channels or channels, channels)
        chosen = activation.mean(dim=(2, 3)).topk(limit, dim=1).indices.sort(dim=1).values
        rows: dict[str, torch.Tensor] = {}

        def zero_channel(_module, _inputs, output):
            output = output.clone()
            output[torch.arange(len(rows["channels"])), rows["channels"]] = 0
            return output

        handle = module.register_forward_hook(zero_channel)
        try:
            for b in range(batch):
                for start in range(0, limit, chunk):
                    rows["channels"] = chosen[b, start:start + chunk]
                    copies = images[b:b + 1].expand(len(rows["channels"]), -1, -1, -1)
                    out = model(copies)
                    ablated[b, rows["channels"]] = out[:, targets[b]].detach().float()
        finally:
            handle.remove()
        safe = torch.where(score == 0, 1.0, score)[:, None]
        weights = torch.where(score[:, None] == 0, 0.0, (score[:, None] - ablated) / safe)
        return torch.relu((weights[:, :, None, None] * activation).sum(dim=1))


def layer_activation(model, layer: str | None, images: torch.Tensor) -> torch.Tensor:
    """One forward, no backward: the target layer's activations (B, K, h, w), detached."""
    with capture_activations(model.layer(layer), keep_grad=False, name=layer) as store:
        model(images)
    return store["activation"].detach()


KERNELS = ("sigmoid", "rbf", "poly", "linear", "cosine")


def kernel_matrix(x: torch.Tensor, kernel: str, gamma: float, coef0: float,
                  degree: int) -> torch.Tensor:
    """k(X, X) for (n, K) rows X, with sklearn's kernel definitions."""
    if kernel == "sigmoid":
        return torch.tanh(gamma * (x @ x.T) + coef0)
    if kernel == "rbf":
        return torch.exp(-gamma * torch.cdist(x, x).pow(2))
    if kernel == "poly":
        return (gamma * (x @ x.T) + coef0) ** degree
    if kernel == "linear":
        return x @ x.T
    if kernel == "cosine":
        unit = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return unit @ unit.T
    raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")


def kernel_pca_projection(features: torch.Tensor, kernel: str = "sigmoid",
                          gamma: float | None = None, coef0: float = 1.0, degree: int = 3,
                          dense_limit: int = 4096) -> torch.Tensor:
    """(B, K, h, w) -> (B, h, w): the first kernel principal component of the centred
    activations, sqrt(lambda_1) v_1, signed so that its entry of largest |.| is positive."""
    batch, channels, height, width = features.shape
    out = []
    for f in features.detach().double().nan_to_num(0.0):
        x = f.reshape(channels, -1).T
        x = x - x.mean(dim=0, keepdim=True)
        k = kernel_matrix(x, kernel, 1.0 / channels if gamma is None else gamma, coef0, degree)
        k = k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()
        n = k.shape[0]
        if n <= dense_limit:
            values, vectors = torch.linalg.eigh(k)
            value, vector = values[-1], vectors[:, -1]
        else:  # a fixed start vector keeps it deterministic
            start = torch.randn(n, 2, generator=torch.Generator().manual_seed(0),
                                dtype=k.dtype)
            values, vectors = torch.lobpcg(k, k=1, X=start[:, :1], largest=True, tol=1e-9)
            value, vector = values[0], vectors[:, 0]
        vector = vector * torch.sign(vector[vector.abs().argmax()])
        out.append((vector * value.clamp(min=0).sqrt()).float().view(height, width))
    return torch.stack(out).to(features.device)


class KPCACAM(_CAMVariant):
    """L = ReLU(sqrt(lambda_1) v_1), the first kernel principal component of the centred
    (hw, K) activations (Karmani et al. 2024; pytorch-grad-cam's KPCA_CAM); 1 F + 0 B."""

    name = "kpca-cam"
    needs_gradients = False
    passes = xbench.Passes(1)
    summary = "KPCA-CAM: first kernel principal component of the activations (1 F)"

    class Options(xbench.Options):
        kernel: str = xbench.option("sigmoid", "kernel of the kernel PCA (pytorch-grad-cam's "
                                    "default sigmoid)", choices=KERNELS)
        gamma: float | None = xbench.option(None, "kernel coefficient (default 1/K, sklearn's)",
                                            above=0.0)
        coef0: float = xbench.option(1.0, "sigmoid/poly kernel offset (sklearn's default)")
        degree: int = xbench.option(3, "poly kernel degree (sklearn's default)", minimum=1)
        dense_limit: int = xbench.option(
            4096, "positions h w up to which the eigenpair is found by a dense "
                  "eigendecomposition; above it, by LOBPCG", minimum=3, in_variant=False)

    def explain(self, model, images, targets):
        o = self.options
        activation = layer_activation(model, self.layer, images)
        return torch.relu(kernel_pca_projection(activation, o.kernel, o.gamma, o.coef0,
                                                o.degree, o.dense_limit))


class ShapleyCAM(_CAMVariant):
    """L = ReLU(sum_k w_k A^k), w_k = mean_ij (G - 1/2 H A)^k_ij, H A the Hessian-vector
    product of the ReST score y^c + log softmax(y)_c (Cai et al. 2025); 1 F + 2 B."""

    name = "shapleycam"
    summary = "ShapleyCAM: gradient minus half the Hessian-vector product as weights (1 F + 2 B)"

    class Options(xbench.Options):
        score: str = xbench.option("rest", "score explained: ReST y^c + log p_c (the paper) "
                                   "or the logit y^c", choices=("rest", "logit"))

    @classmethod
    def expected_passes(cls, options, facts):
        # the Hessian-vector product's double backward is a second backward pass
        return xbench.Passes(1, 2 if options.score == "rest" else 1)

    def explain(self, model, images, targets):
        module = model.layer(self.layer)
        with torch.enable_grad(), capture_activations(module, keep_grad=False,
                                                      name=self.layer) as store:
            logits = model(images.detach().requires_grad_(True))
            activation = store["activation"]
            score = logits.gather(1, targets[:, None])
            if self.options.score == "rest":
                score = score + logits.log_softmax(dim=1).gather(1, targets[:, None])
            (gradient,) = torch.autograd.grad(score.sum(), activation, create_graph=True)
            if gradient.requires_grad:
                (hvp,) = torch.autograd.grad(gradient, activation,
                                             grad_outputs=activation.detach(),
                                             allow_unused=True)
            else:  # the gradient does not depend on A: H A = 0
                hvp = None
        hvp = torch.zeros_like(activation) if hvp is None else hvp.detach()
        weights = (gradient.detach() - 0.5 * hvp).mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * activation.detach()).sum(dim=1))


class FinerCAM(_CAMVariant):
    """Grad-CAM of sum_j p_j (y^c - alpha y^j) / (sum_j p_j + eps) over the classes j with the
    nearest logits (Zhang et al. 2025; pytorch-grad-cam's FinerCAM over GradCAM); 1 F + 1 B."""

    name = "finercam"
    summary = "Finer-CAM: Grad-CAM of the target against its most similar classes (1 F + 1 B)"

    class Options(xbench.Options):
        alpha: float = xbench.option(1.0, "weight of the compared classes' logits (the "
                                     "paper's and pytorch-grad-cam's default)", minimum=0.0)
        comparisons: int = xbench.option(3, "compared classes: those whose logits are nearest "
                                         "the target's (pytorch-grad-cam's 1, 2, 3)", minimum=1)
        eps: float = xbench.option(1e-9, "added to sum_j p_j (pytorch-grad-cam's value)",
                                   minimum=0.0)

    def explain(self, model, images, targets):
        module = model.layer(self.layer)
        o = self.options
        with torch.enable_grad(), capture_activations(module, keep_grad=False,
                                                      name=self.layer) as store:
            logits = model(images.detach().requires_grad_(True))
            activation = store["activation"]
            main = logits.gather(1, targets[:, None])
            distance = (logits.detach() - main.detach()).abs()
            distance.scatter_(1, targets[:, None], -1.0)  # the target itself sorts first
            count = min(o.comparisons, logits.shape[1] - 1)
            others = distance.argsort(dim=1, stable=True)[:, 1:1 + count]
            p = logits.softmax(dim=1).gather(1, others)
            score = (p * (main - o.alpha * logits.gather(1, others))).sum(dim=1) / (
                p.sum(dim=1) + o.eps)
            (gradient,) = torch.autograd.grad(score.sum(), activation)
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * activation.detach()).sum(dim=1))


class RandomCAM(_CAMVariant):
    """L = ReLU(sum_k w_k A^k), w_k ~ U(-1, 1) seeded per image (pytorch-grad-cam's
    RandomCAM, a control); 1 F + 0 B."""

    name = "randomcam"
    needs_gradients = False
    passes = xbench.Passes(1)
    summary = "RandomCAM: random channel weights U(-1, 1), a CAM-shaped control (1 F)"

    def explain(self, model, images, targets):
        activation = layer_activation(model, self.layer, images)
        channels = activation.shape[1]
        weights = torch.from_numpy(np.stack([
            np.random.RandomState(image_seed(self.seed, image) % 2 ** 32).uniform(-1, 1, channels)
            for image in images])).to(activation.device, activation.dtype)
        return torch.relu((weights[:, :, None, None] * activation).sum(dim=1))


@hookimpl
def register_explainers(register):
    for cls in (XGradCAM, HiResCAM, GradCAMElementWise, EigenCAM, EigenGradCAM, AblationCAM,
                KPCACAM, ShapleyCAM, FinerCAM, RandomCAM):
        register(cls)
