"""Running test ranks of a gloo process group in child processes."""
import torch
import torch.multiprocessing as mp


def run_ranks(worker, args, nprocs: int) -> None:
    """``worker(rank, *args)`` in ``nprocs`` processes, joined. Fork when safe: the ranks inherit
    the imported modules (a spawned child re-imports the test file and verl, ~6 s each). Once this
    process has touched CUDA (autograd then runs device threads) a forked child cannot use
    autograd or CUDA, so spawn."""
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(worker, args=args, nprocs=nprocs, join=True, start_method=method)
