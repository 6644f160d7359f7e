"""Triton backend of fusedres: ``fusedres.triton.bn_act`` meets the ``fusedres.ops.torch_backend`` contract."""
