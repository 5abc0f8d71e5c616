from dsla_serve.layers.dsla_attention import DSLAAttention
from dsla_serve.ops.naive import rotate

__all__ = ["DSLAAttention", "rotate"]
