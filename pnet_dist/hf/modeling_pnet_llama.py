"""ParameterNet-LLaMA for Hugging Face transformers (shipped in pnet_dist exports, trust_remote_code).

transformers' LlamaForCausalLM -- attention, rotary embeddings, KV cache, generation -- with the
configured FFN projection of every decoder layer replaced by `PnetTopOneMoE`. Weight names are
LLaMA's, and the MoE projection's are `<proj>.router.weight` and `<proj>.experts.<e>.weight/.bias`.
Computes the logits of pnet_dist.models.llama.LlamaForCausalLM for the same weights. The forward
returns the language-model loss only: the Switch load-balancing loss of training is not added.

Shapes: N tokens, I projection input, O projection output, E experts.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from .configuration_pnet_llama import PnetLlamaConfig


class PnetTopOneMoE(nn.Module):
    """Top-1 mixture of experts in place of one Linear(d_in, d_out, bias=False).

    probs = softmax(router(x)) in fp32; each token goes to its most probable expert e and gets
    probs[e] * expert_e(x). A token past an expert's capacity (if capacity_factor is set) gets 0.
    """

    def __init__(self, d_in, d_out, num_experts, expert_bias, capacity_factor):
        super().__init__()
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(d_in, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d_in, d_out, bias=expert_bias) for _ in range(num_experts))

    def forward(self, x):
        x_NI = x.reshape(-1, x.shape[-1])
        with torch.autocast(device_type=x.device.type, enabled=False):
            probs_NE = F.linear(x_NI.float(), self.router.weight.float()).softmax(dim=-1)
        gate_N, expert_N = probs_NE.max(dim=-1)
        kept_N = torch.ones_like(expert_N, dtype=torch.bool)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * expert_N.numel() / len(self.experts))
            one_hot_NE = F.one_hot(expert_N, len(self.experts))
            place_N = (one_hot_NE.cumsum(dim=0) * one_hot_NE).sum(dim=-1) - 1   # arrival order at its expert
            kept_N = place_N < capacity
        y_NO = x_NI.new_zeros(x_NI.shape[0], self.experts[0].out_features)
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero((expert_N == e) & kept_N).squeeze(1)
            y_NO[rows] = expert(x_NI[rows]) * gate_N[rows, None].to(x.dtype)
        return y_NO.view(*x.shape[:-1], -1)


class PnetLlamaForCausalLM(LlamaForCausalLM):
    config_class = PnetLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        shapes = {"gate": (config.hidden_size, config.intermediate_size),
                  "up": (config.hidden_size, config.intermediate_size),
                  "down": (config.intermediate_size, config.hidden_size)}
        d_in, d_out = shapes[config.moe_placement]
        for layer in self.model.layers:
            moe = PnetTopOneMoE(d_in, d_out, config.num_experts, config.expert_bias, config.capacity_factor)
            setattr(layer.mlp, f"{config.moe_placement}_proj", moe)
        self.post_init()
