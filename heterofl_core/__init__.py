"""HeteroFL: federated learning for clients of unequal compute (Diao et al., ICLR 2021)."""

__version__ = "0.1.0"
