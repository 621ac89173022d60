"""Pure-torch ParameterNet models: dynamic convolution, GhostNet/ParameterNet, LLaMA with MoE.

Nothing here imports deepspeed, ray, boto3, streaming, tensorboard or the config module.
"""
from pnet_dist.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
from pnet_dist.models.dynamic_conv import DynamicConv2d  # noqa: E402  (vision: dynamic convolution)

__all__ += ["DynamicConv2d"]
from pnet_dist.models import ghostnet as _ghostnet  # noqa: E402,F401  (registers the GhostNet/ParameterNet models)
from pnet_dist.models import llama as _llama  # noqa: E402,F401  (registers the LLaMA / ParameterNet-LLaMA models)
from pnet_dist.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from pnet_dist.models.moe import MoEProjection, moe_stats, shard_experts  # noqa: E402

__all__ += ["LlamaConfig", "LlamaForCausalLM", "MoEProjection", "moe_stats", "shard_experts"]
