"""The quick start from the README: one script for CUDA, ROCm, XPU, MPS and CPU.

Run it any way you like:

    python examples/quickstart.py                                  # one process
    torchrun --standalone --nproc-per-node=2 examples/quickstart.py
    srun -n 2 python examples/quickstart.py                        # SLURM
    mpirun -n 2 -x MASTER_PORT=29511 python examples/quickstart.py # OpenMPI, one node
    mpiexec -n 2 python examples/quickstart.py                     # MPICH / Intel MPI
    accelerate launch --multi_gpu --num_processes 2 examples/quickstart.py  # CPU too

(``accelerate launch --cpu --num_processes 2`` starts ONE process unless it is also given
``--mpirun_hostfile``; ``--multi_gpu`` makes it start torchrun, which works on CPUs too.)
"""

import torch

import devlayer

if __name__ == "__main__":
    with devlayer.init():  # backend, device and process group from the launcher's env
        dev = devlayer.device()  # cuda:<local rank>, xpu:<n>, mps, or cpu
        model = torch.nn.Linear(4, 1).to(dev)
        x = torch.randn(64, 4, device=dev)
        loss = model(x).pow(2).mean()
        avg = devlayer.all_reduce({"loss": loss.detach(), "samples": len(x)}, op="mean")
        if devlayer.is_main():
            n = devlayer.world_size()
            print(f"{n} rank(s) on {dev.type}: mean loss {avg['loss'].item():.4f}")
        devlayer.barrier()
