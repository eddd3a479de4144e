"""A short tour of the blocks: what each computes, its cost, and its attention maps on one image.

The weights are untrained (random, fixed seed): the picture shows the maps' form (query-dependent
non-local maps vs. GC's single map), not what a trained network attends to.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gcnet.blocks import GlobalContext, NonLocal, SimplifiedNonLocal, SqueezeExcite
from gcnet.config import data_root

DEFAULT_IMAGE = "cifar10/test/cat/0000.jpg"  # under the data root (gcnet.config.data_root)
QUERIES = [(0.25, 0.25), (0.5, 0.6), (0.8, 0.3)]


def tour_blocks(channels: int = 64) -> dict[str, nn.Module]:
    """One block of each kind, as the tour shows them."""
    return {
        "GC (r16, add)": GlobalContext(channels),
        "GC (avg, scale)": GlobalContext(channels, pooling="average", fusion="scale", norm=False),
        "SNL": SimplifiedNonLocal(channels),
        "SE (r16)": SqueezeExcite(channels),
        "NL gaussian": NonLocal(channels, mode="gaussian"),
        "NL embedded gaussian": NonLocal(channels, mode="embedded_gaussian"),
        "NL dot product": NonLocal(channels, mode="dot_product"),
        "NL concatenation": NonLocal(channels, mode="concatenation"),
    }


def _load_image(path: Path | None, size: int) -> torch.Tensor:
    """(3, size, size) in [0, 1]: the given image, the default CIFAR-10 image, or a generated one."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor, resize

    default = data_root() / DEFAULT_IMAGE
    path = path or (default if default.is_file() else None)
    if path is None:
        grid = torch.linspace(0, 1, size)
        return torch.stack([grid.expand(size, size), grid[:, None].expand(size, size), torch.full((size, size), 0.5)])
    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as file:
        image = pil_to_tensor(file.convert("RGB"))
    return resize(image, [size, size], antialias=True).float() / 255


def run_tour(out_dir: str | Path = "outputs/tour", image: str | Path | None = None) -> Path:
    """Print the block table and save the attention-map picture; returns the picture's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    x = torch.randn(2, 64, 14, 14)
    print(f"{'block':<22} {'params':>8} {'output':<18} {'identity at init':<16}")
    blocks = tour_blocks()
    for name, block in blocks.items():
        with torch.no_grad():
            y = block.train()(x)
        params = sum(p.numel() for p in block.parameters())
        print(f"{name:<22} {params:>8,} {str(tuple(y.shape)):<18} {str(torch.equal(y, x)):<16}")

    size = 32
    picture = _load_image(Path(image) if image else None, size)
    shown = picture.permute(1, 2, 0).numpy()  # (H, W, 3)
    features = nn.Conv2d(3, 64, 3, padding=1)(picture[None] - 0.5).detach()  # (1, 64, H, W)
    nl = NonLocal(64, mode="embedded_gaussian", scale="inner")
    gc = GlobalContext(64)
    with torch.no_grad():
        nl_maps = nl.attention_map(features)[0].reshape(size * size, size, size)  # (N, H, W) per query
        gc_map = gc.attention_map(features)[0, 0].reshape(size, size)
    fig, axes = plt.subplots(1, len(QUERIES) + 2, figsize=(3 * (len(QUERIES) + 2), 3.2))
    axes[0].imshow(shown)
    axes[0].set_title("image")
    for ax, (qy, qx) in zip(axes[1:], QUERIES):
        row, col = int(qy * size), int(qx * size)
        ax.imshow(shown)
        ax.imshow(nl_maps[row * size + col].numpy(), cmap="jet", alpha=0.55)
        ax.plot(col, row, "w*", markersize=12)
        ax.set_title(f"NL map, query ({row}, {col})")
    axes[-1].imshow(shown)
    axes[-1].imshow(gc_map.numpy(), cmap="jet", alpha=0.55)
    axes[-1].set_title("GC map (any query)")
    for ax in axes:
        ax.axis("off")
    fig.suptitle("Attention maps of untrained blocks (random weights, seed 0)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "attention_maps.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"attention maps: {path}")
    return path
