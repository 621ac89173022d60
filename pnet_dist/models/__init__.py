"""Pure-torch ParameterNet models: dynamic convolution, GhostNet/ParameterNet, LLaMA with MoE.

Nothing here imports deepspeed, ray, boto3, streaming, tensorboard or the config module.
"""
from pnet_dist.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
