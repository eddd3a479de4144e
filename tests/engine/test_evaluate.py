import torch
from torch import nn

from gcnet.engine.distributed import DistContext
from gcnet.engine.evaluate import evaluate, make_eval_loader
from gcnet.engine.metrics import topk_correct


class FirstPixel(nn.Module):
    """Logits = the first two values of each clip, so the test controls every clip's scores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :2]


def test_multi_clip_scores_are_averaged() -> None:
    # One video, 3 clips: two weakly favour class 0, one strongly favours class 1.
    clips = torch.zeros(3, 1, 1, 1, 2)  # (K, C, T, H, W)
    clips[0, 0, 0, 0] = torch.tensor([1.0, 0.0])
    clips[1, 0, 0, 0] = torch.tensor([1.0, 0.0])
    clips[2, 0, 0, 0] = torch.tensor([0.0, 9.0])
    context = DistContext(0, 1, 0, torch.device("cpu"), None)
    loader = make_eval_loader([(clips, 1)], batch_size=1, workers=0, context=context)
    metrics = evaluate(FirstPixel(), loader, context)
    probs = clips.flatten(1)[:, :2].softmax(1).mean(0)
    assert metrics["top1"] == 100.0  # averaged scores pick class 1; a majority vote would pick 0
    assert abs(metrics["loss"] + probs[1].log().item()) < 1e-6


def test_topk_correct() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    assert topk_correct(logits, torch.tensor([2, 0]), ks=(1, 2, 5)) == [1, 2, 2]
