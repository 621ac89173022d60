"""Configuration of ParameterNet-LLaMA for Hugging Face transformers (shipped in pnet_dist exports).

LLaMA (transformers' LlamaConfig) with ONE projection of every SwiGLU FFN -- gate, up or down --
replaced by a top-1 mixture of experts (ParameterNet, arXiv 2306.14525, Table 7). This file and
modeling_pnet_llama.py are copied into every exported MoE folder and load with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`; they import only
transformers and torch.
"""
from transformers import LlamaConfig

MOE_PLACEMENTS = ("gate", "up", "down")


class PnetLlamaConfig(LlamaConfig):
    """LlamaConfig plus the MoE projection.

    moe_placement: which FFN projection is the mixture ("gate" | "up" | "down").
    num_experts: experts of that projection; each is a Linear with a bias if expert_bias.
    capacity_factor: None (no token is dropped), or at most ceil(capacity_factor * N / E) of the
        N tokens of one forward call go to each expert, in (batch, position) order.
    """

    model_type = "pnet_llama"

    def __init__(self, moe_placement="up", num_experts=8, expert_bias=True, capacity_factor=None, **kwargs):
        if moe_placement not in MOE_PLACEMENTS:
            raise ValueError(f"moe_placement must be one of {MOE_PLACEMENTS}, got {moe_placement!r}")
        if num_experts < 2:
            raise ValueError(f"num_experts must be >= 2, got {num_experts}")
        self.moe_placement = moe_placement
        self.num_experts = num_experts
        self.expert_bias = expert_bias
        self.capacity_factor = capacity_factor
        super().__init__(**kwargs)
