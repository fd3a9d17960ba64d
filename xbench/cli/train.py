"""``xbench train TRAINER ...``: train the learnable parts of built-in plugins.

Each trainer lives in its own module, defining ``add_arguments(parser)`` and ``run(args)``.
"""

from __future__ import annotations

import importlib

TRAINERS = {
    "lcam": ("xbench.cli.train_lcam", "train an L-CAM attention head on a frozen classifier"),
    "mutual-transfer": ("xbench.cli.train_mutual_transfer",
                        "train two students with local attention map mutual transfer"),
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train L-CAM heads or mutual-transfer students")
    trainers = parser.add_subparsers(dest="trainer", required=True, metavar="TRAINER")
    for name, (module, help_text) in TRAINERS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        sub = trainers.add_parser(name, help=help_text)
        mod.add_arguments(sub)
        sub.set_defaults(func=mod.run)
