"""Pure-PyTorch references of every fastrl op: the spec the kernels are tested against, and what
``FASTRL_BACKEND=reference`` runs. Clear before fast; fp64 where precision matters."""
