"""Pure-torch ParameterNet models: dynamic convolution, GhostNet/ParameterNet, LLaMA with MoE.

Nothing here imports deepspeed, ray, boto3, streaming, tensorboard, timm or the config module;
the vision models join timm's registry when the process imports timm (see timm_interop).
"""
from pnet_dist.models.registry import create_model, get_pretrained_cfg, list_models, register_model

__all__ = ["create_model", "get_pretrained_cfg", "list_models", "register_model"]
from pnet_dist.models.dynamic_conv import DynamicConv2d  # noqa: E402  (vision: dynamic convolution)

__all__ += ["DynamicConv2d"]
from pnet_dist.models import ghostnet as _ghostnet  # noqa: E402,F401  (registers the GhostNet/ParameterNet models)
from pnet_dist.models import llama as _llama  # noqa: E402,F401  (registers the LLaMA / ParameterNet-LLaMA models)
from pnet_dist.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from pnet_dist.models.moe import MoEProjection, moe_stats, shard_experts  # noqa: E402

__all__ += ["LlamaConfig", "LlamaForCausalLM", "MoEProjection", "moe_stats", "shard_experts"]
from pnet_dist.models.timm_interop import register_when_timm_is_imported  # noqa: E402

register_when_timm_is_imported()
