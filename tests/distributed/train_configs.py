"""Run `rgemma.training.train` on each train config given, in order, in one process
group: `torchrun --nproc_per_node N tests/distributed/train_configs.py A.json B.json`.

The process group is created here, once, so every run uses it as it is (the path of
a caller with its own launcher: `training.distributed.init_distributed` joins no new
group and leaves this one alone) and the launch's startup is paid once.
"""

import sys

import torch.distributed as dist

from rgemma.training import TrainConfig, train

if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        for path in sys.argv[1:]:
            train(TrainConfig.from_file(path))
    finally:
        dist.destroy_process_group()
