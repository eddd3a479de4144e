"""Write tests/reference/model_complexity.json: params and FLOPs of every registered model.

Run once after adding or changing a model (`python tests/reference/make_model_complexity.py`),
then review the diff: the numbers are the reference that tests/analysis/test_complexity.py holds
the models to. FLOPs are torch.utils.flop_counter's (2 per multiply-add) at each model's usual
input (224 x 224 images, 8 x 224 x 224 clips, 32 x 32 CIFAR images).
"""

from __future__ import annotations

import json
from pathlib import Path

from gcnet.analysis.complexity import complexity_of, default_input_shape
from gcnet.models import list_models

PATH = Path(__file__).with_name("model_complexity.json")


def main() -> None:
    table = {}
    for name in list_models():
        shape = default_input_shape(name)
        report = complexity_of(name, shape)
        table[name] = {"input_shape": list(shape), "params": report.params, "flops": report.flops}
    lines = [f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in table.items()]
    PATH.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {len(table)} models to {PATH}")


if __name__ == "__main__":
    main()
