from dsla_serve.layers.dsla_attention import DSLAAttention, rotate

__all__ = ["DSLAAttention", "rotate"]
