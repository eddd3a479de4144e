"""Turn a trained non-local block into a query-independent block from its own weights, without retraining.

Cao et al., "GCNet", arXiv:1904.11492, Sec. 3: the attention maps of a trained NL block are
nearly the same for every query. Given one map alpha for every query, the NL block becomes the SNL
block (Eq. 3) with

    z_i = x_i + BN(W_z sum_j alpha_j (W_g x_j + b_g) + b_z) = x_i + W_v c + b_v,  c = sum_j alpha_j x_j
    W_v = diag(s) W_z W_g,  b_v = s (W_z b_g + b_z - mu) + beta,  s = gamma / sqrt(var + eps)

since sum_j alpha_j = 1 and BN at eval is affine. That fold is exact; the key of
alpha_j = softmax_j(w_k . x_j + b) is fitted to the NL block's query-averaged map.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gcnet.analysis.report import batches_of
from gcnet.analysis.statistics import mean_cosine_distance
from gcnet.blocks import GlobalContext, NonLocal, SimplifiedNonLocal
from gcnet.blocks.non_local import SOFTMAX_MODES


@dataclass(frozen=True)
class FitReport:
    """How well one map per input stands in for an NL block's per-query maps; means over samples.

    Attributes:
        kl_fitted: KL(query-averaged NL map || fitted map), in nats.
        kl_uniform: KL(query-averaged NL map || uniform map), in nats: the map of a key that ignores x.
        cosine_distance: mean 1 - cos between the NL maps of different queries (GCNet Table 1);
            0 when every query has the same map.
        samples: inputs the means are over.
    """

    kl_fitted: float
    kl_uniform: float
    cosine_distance: float
    samples: int


# One calibration batch: positions (B, N, C), query-averaged map (B, N), cosine distance (B,); float64.
_Batch = tuple[Tensor, Tensor, Tensor]


def check_convertible(block: nn.Module, name: str = "block") -> NonLocal:
    """Return `block` if its value path folds and its maps are softmax distributions, else raise why not."""
    if not isinstance(block, NonLocal):
        raise TypeError(f"{name}: expected a NonLocal block, got {type(block).__name__}")
    if block.mode not in SOFTMAX_MODES:
        raise ValueError(
            f"{name}: mode {block.mode!r} cannot be converted: its maps f(x_i, x_j) / N are not softmax "
            f"distributions over positions, so no softmax key can match them; expected one of {list(SOFTMAX_MODES)}"
        )
    if block.subsample:
        raise ValueError(
            f"{name}: subsample=True cannot be converted: max-pooling g(x) over positions makes the value "
            "path non-linear in x, so it does not fold into one C -> C layer; expected subsample=False"
        )
    if block.bn is not None and (block.bn.running_mean is None or block.bn.running_var is None):
        raise ValueError(
            f"{name}: its BatchNorm keeps no running statistics (track_running_stats=False), so it normalises "
            "with batch statistics and is not a fixed affine map; expected a BatchNorm with running statistics"
        )
    return block


def _fold_value_path(block: NonLocal) -> tuple[Tensor, Tensor]:
    """W_v (C, C) and b_v (C,) of x -> BN(W_z (W_g x + b_g) + b_z), BN with its running statistics."""
    weight = block.w_z.weight @ block.g.weight  # (C, C') @ (C', C)
    bias = block.w_z.weight @ block.g.bias
    if block.w_z.bias is not None:
        bias = bias + block.w_z.bias
    bn = block.bn
    if bn is None:
        return weight, bias
    scale = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0.0)
    return scale[:, None] * weight, scale * bias + shift


def _averaged_maps(block: NonLocal, inputs: Iterable[Tensor]) -> list[_Batch]:
    """Positions, query-averaged maps and query cosine distances of float64 `block` on each input."""
    device = block.g.weight.device
    batches = []
    with torch.no_grad():
        for x in inputs:
            if not isinstance(x, Tensor):
                raise TypeError(f"calibration inputs must be tensors (B, C, *positions), got {type(x).__name__}")
            x = x.detach().to(device=device, dtype=torch.float64)
            maps = block.attention_map(x)  # (B, N, N)
            positions = x.flatten(2).transpose(1, 2)  # (B, N, C)
            batches.append((positions, maps.mean(dim=1), mean_cosine_distance(maps)))
    if not batches:
        raise ValueError("got no calibration inputs; expected at least one (B, C, *positions) tensor")
    by_positions: dict[int, list[_Batch]] = {}
    for batch in batches:  # one tensor per input size: the fit then runs a few large ops, not many small ones
        by_positions.setdefault(batch[0].shape[1], []).append(batch)
    return [tuple(torch.cat(parts) for parts in zip(*group)) for group in by_positions.values()]  # type: ignore[misc]


def _initial_key(block: NonLocal, batches: list[_Batch]) -> Tensor:
    """w_k of the query-averaged logits: scale * W_phi^T mean(theta_i), or scale * mean(x_i) for gaussian."""
    samples = sum(positions.shape[0] for positions, _, _ in batches)
    mean_x = sum(positions.mean(dim=1).sum(dim=0) for positions, _, _ in batches) / samples  # (C,)
    if block.theta is None or block.phi is None:
        return block.scale_factor * mean_x
    mean_theta = block.theta(mean_x)  # theta is affine, so theta(mean x) = mean theta(x)
    return block.scale_factor * (block.phi.weight.t() @ mean_theta)


def _kl_terms(batches: list[_Batch], key: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample KL(p || softmax(x . key)) and KL(p || uniform), concatenated over batches."""
    fitted, uniform = [], []
    for positions, target, _ in batches:
        negative_entropy = torch.special.xlogy(target, target).sum(dim=-1)  # (B,)
        log_q = (positions @ key).log_softmax(dim=-1)  # (B, N)
        fitted.append(negative_entropy - (target * log_q).sum(dim=-1))
        uniform.append(negative_entropy + math.log(target.shape[-1]))
    return torch.cat(fitted), torch.cat(uniform)


def _fit_key(initial: Tensor, batches: list[_Batch], steps: int) -> Tensor:
    """Minimise the mean KL over samples with L-BFGS from `initial`; keeps the start if that is better."""
    key = initial.detach().clone().requires_grad_(True)
    if steps == 0:
        return key.detach()
    optimizer = torch.optim.LBFGS(
        [key], lr=1.0, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = _kl_terms(batches, key)[0].mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        start = float(closure().detach())
        optimizer.step(closure)
    with torch.no_grad():
        end = float(_kl_terms(batches, key)[0].mean())
    return key.detach() if end <= start else initial.detach().clone()


def _report(batches: list[_Batch], key: Tensor) -> FitReport:
    with torch.no_grad():
        fitted, uniform = _kl_terms(batches, key)
    cosine = torch.cat([distance for _, _, distance in batches])
    cosine = cosine[~cosine.isnan()]
    return FitReport(
        kl_fitted=float(fitted.mean()),
        kl_uniform=float(uniform.mean()),
        cosine_distance=float(cosine.mean()) if cosine.numel() else math.nan,
        samples=int(fitted.numel()),
    )


def convert_nonlocal(
    block: NonLocal, calibration: Iterable[Tensor], steps: int = 100
) -> tuple[SimplifiedNonLocal, FitReport]:
    """A query-independent SNL block computed from a trained NL block's weights, and how well its map fits.

    The value path is folded exactly (module docstring), using the BN's running statistics, i.e. the
    NL block's eval-mode output. The key w_k is fitted on `calibration`, tensors (B, C, *positions)
    as the NL block receives them: the objective is the mean over samples of
    KL(mean_i A_i || softmax_j(w_k . x_j)), A_i the NL map of query i. That is convex in w_k; the
    solver starts from the query-averaged logits (scale * W_phi^T mean(theta_i) over the calibration
    set; scale * mean(x_i) for gaussian) and runs L-BFGS with strong-Wolfe line search for up to
    `steps` iterations in float64. The key's bias is 0: a softmax over positions ignores it.

    The input block is not changed; the result has its dtype, device and train/eval flag.
    Sub-sampling blocks and the dot-product and concatenation modes raise ValueError (see
    `check_convertible`).
    """
    check_convertible(block)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    float64 = copy.deepcopy(block).double().eval()
    weight, bias = _fold_value_path(float64)
    batches = _averaged_maps(float64, calibration)
    with torch.no_grad():
        initial = _initial_key(float64, batches)
    key = _fit_key(initial, batches, steps)

    converted = SimplifiedNonLocal(block.channels).to(device=weight.device, dtype=torch.float64)
    with torch.no_grad():
        converted.key.weight.copy_(key.view(1, -1))  # type: ignore[union-attr]
        converted.key.bias.zero_()  # type: ignore[union-attr]
        converted.add_transform.last.weight.copy_(weight)  # type: ignore[union-attr]
        converted.add_transform.last.bias.copy_(bias)  # type: ignore[union-attr]
    reference = block.g.weight
    converted.to(device=reference.device, dtype=reference.dtype).train(block.training)
    return converted, _report(batches, key)


def fit_report(block: NonLocal, converted: GlobalContext, inputs: Iterable[Tensor]) -> FitReport:
    """The FitReport of `converted`'s key against `block`'s maps on any inputs, e.g. held-out ones."""
    check_convertible(block)
    if converted.key is None:
        raise ValueError("converted block has average pooling; expected an attention-pooling GlobalContext")
    if converted.channels != block.channels:
        raise ValueError(f"converted block has {converted.channels} channels; expected {block.channels} like the NL block")
    batches = _averaged_maps(copy.deepcopy(block).double().eval(), inputs)
    return _report(batches, converted.key.weight.detach().to(dtype=torch.float64, device=batches[0][0].device).view(-1))


def _block_inputs(model: nn.Module, blocks: dict[str, NonLocal], calibration: Iterable[Tensor]) -> dict[str, list[Tensor]]:
    """Each block's inputs over one eval-mode, no-grad pass of `model` per calibration batch."""
    captured: dict[str, list[Tensor]] = {name: [] for name in blocks}

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            captured[name].append(args[0].detach().clone())

        return hook

    handles = [block.register_forward_pre_hook(hook_for(name)) for name, block in blocks.items()]
    modes = {module: module.training for module in model.modules()}
    device = next((p.device for p in model.parameters()), None)
    try:
        model.eval()
        with torch.no_grad():
            for inputs in calibration:
                model(inputs if device is None else inputs.to(device))
    finally:
        for module, training in modes.items():
            module.training = training
        for handle in handles:
            handle.remove()
    missing = [name for name, inputs in captured.items() if not inputs]
    if missing:
        raise ValueError(f"blocks {missing} saw no input during calibration; expected calibration batches that run them")
    return captured


def convert_model(
    model: nn.Module, calibration: Iterable[Tensor], steps: int = 100
) -> tuple[nn.Module, dict[str, FitReport]]:
    """A deep copy of `model` with every NonLocal block replaced by `convert_nonlocal`'s SNL block.

    `calibration` holds model inputs. Every block is fitted on the inputs it receives in the original
    model (one eval-mode pass per batch); replacements keep the module names, so the copy runs as
    before. `model` is not changed. Returns the copy and a FitReport per block name.
    """
    converted = copy.deepcopy(model)
    blocks = {name: module for name, module in converted.named_modules() if isinstance(module, NonLocal)}
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no NonLocal block to convert")
    for name, block in blocks.items():
        check_convertible(block, name or type(block).__name__)
    if "" in blocks:  # the model is itself a NonLocal block
        block, report = convert_nonlocal(converted, calibration, steps)  # type: ignore[arg-type]
        return block, {type(model).__name__: report}
    inputs = _block_inputs(converted, blocks, calibration)
    reports: dict[str, FitReport] = {}
    for name, block in blocks.items():
        replacement, reports[name] = convert_nonlocal(block, inputs[name], steps)
        parent_name, _, attribute = name.rpartition(".")
        setattr(converted.get_submodule(parent_name), attribute, replacement)
    return converted, reports


def convert_checkpoint(checkpoint: str | Path, data: str, out: str | Path, calibration: str | None = None,
                       batches: int = 4, batch_size: int = 32, steps: int = 100) -> dict[str, Any]:
    """Convert a trained classification checkpoint's NL blocks, evaluate both models, write OUT/report.json.

    The keys are fitted on the first `batches` of `calibration` (default: the run's training data,
    with evaluation transforms), and both models are scored on `data` with the same CPU loader, so
    the accuracy change is the conversion's alone. Writes OUT/converted.safetensors and
    OUT/report.json (per block FitReport, top-1 before and after, MACs per input); returns the report.
    """
    from gcnet.builder import load_trained
    from gcnet.engine import distributed
    from gcnet.engine.evaluate import evaluate, make_eval_loader
    from gcnet.engine.metrics import count_flops
    from gcnet.models import save_state_dict_file

    if batches < 1 or batch_size < 1 or steps < 0:
        raise ValueError(f"batches and batch_size must be >= 1 and steps >= 0, got {batches}, {batch_size} and {steps}")
    trained = load_trained(checkpoint)
    if trained.config.task == "detection":
        raise ValueError("convert-nl takes classification checkpoints (image or video); this one is detection")
    source = calibration or trained.config.data.train
    inputs = list(itertools.islice(batches_of(trained.eval_dataset(source), batch_size), batches))
    if not inputs:
        raise ValueError(f"{source}: no readable inputs to calibrate on")
    converted, reports = convert_model(trained.model, inputs, steps)
    dataset = trained.eval_dataset(data)
    context = distributed.setup("cpu")
    try:
        settings = trained.config.data
        loader = make_eval_loader(dataset, settings.eval_batch_size or settings.batch_size, 0, context)
        before, after = evaluate(trained.model, loader, context), evaluate(converted, loader, context)
    finally:
        distributed.cleanup(context)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = save_state_dict_file(converted, out / "converted.safetensors")
    example = inputs[0][:1]
    report = {
        "checkpoint": str(trained.checkpoint.path), "calibration": str(source), "weights": str(weights),
        "blocks": {name: dataclasses.asdict(fit) for name, fit in reports.items()},
        "top1": {"original": before["top1"], "converted": after["top1"]}, "samples": after["samples"],
        "macs": {"original": count_flops(trained.model, example), "converted": count_flops(converted, example)},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
