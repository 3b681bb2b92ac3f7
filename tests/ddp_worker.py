"""Run under torchrun by tests/test_distributed.py: train several tiny runs in one process group
and save each rank's final weights and optimizer state, so that the test can compare ranks."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from altgrad.training import Trainer, resolve_config


def main() -> None:
    out, data, runs = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name, settings in runs.items():
        config = resolve_config(None, {"preset": "tiny", "data": data, "runs_dir": str(out / "runs"),
                                       "run_name": name, "device": "cpu", **settings})
        trainer = Trainer(config)
        trainer.run()
        state = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()}
        torch.save(state, out / f"{name}-rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
