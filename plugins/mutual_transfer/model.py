"""The Model plugin ``mutual-transfer``: one student of a checkpoint."""

from __future__ import annotations

import xbench
from xbench import LoadedModel, Model, UserError
from xbench_plugins.mutual_transfer.checkpoint import MEMBERS, read_checkpoint, restore_student


class MutualTransferModel(Model):
    """One student (``member`` st1 or st2) of a mutual-transfer checkpoint."""

    name = "mutual-transfer"
    summary = "a student trained with local attention map mutual transfer (Cheng et al. 2022)"

    class Options(Model.Options):
        checkpoint: str | None = xbench.option(
            None, "checkpoint of 'xbench train mutual-transfer' (--checkpoint; weights works too)")
        member: str = xbench.option("st1", "which student of the checkpoint (--member)",
                                    choices=MEMBERS)

    @property
    def checkpoint(self) -> str | None:
        return self.options.checkpoint or self.options.weights

    def load(self) -> LoadedModel:
        if not self.checkpoint:
            raise UserError(
                "model 'mutual-transfer' needs a checkpoint (--checkpoint CKPT). Train one, e.g. "
                "'xbench train mutual-transfer --st1 small-wrn --st2 small-mobilenet --data digits "
                "--lambda 0.5 --beta 1 --epochs 4 --output mt.pt' (a few minutes on a CPU)")
        payload = read_checkpoint(self.checkpoint)
        student = restore_student(payload["members"][self.options.member])
        return LoadedModel(
            module=student.net.eval(), input_size=student.input_size, mean=student.mean,
            std=student.std, class_names=tuple(payload["class_names"]),
            default_layer=student.default_layer, resize_size=student.resize_size,
            weights=f"{self.checkpoint}#{self.options.member}",
            extra={"member": self.options.member, "arch": student.arch,
                   "config": dict(payload.get("config", {}))},
        )
