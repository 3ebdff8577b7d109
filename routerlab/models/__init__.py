"""Models: an MoE MLP classifier and a small causal MoE transformer LM."""
from routerlab.models.common import DenseFFN, MoEModel
from routerlab.models.mlp import MoEClassifier
from routerlab.models.transformer import MoETransformerLM
from routerlab.registry import Spec


def build_model(model_cfg, router_spec: Spec, task) -> MoEModel:
    """The model for a task's kind; every MoE layer gets a router built from `router_spec`."""
    if task.kind == "lm":
        if model_cfg.d_model % model_cfg.n_heads:
            from routerlab.errors import ConfigError

            raise ConfigError(f"model.d_model={model_cfg.d_model} must be divisible by model.n_heads={model_cfg.n_heads}")
        return MoETransformerLM(model_cfg, router_spec, task.vocab_size, task.block_size)
    return MoEClassifier(model_cfg, router_spec, task.input_dim, task.num_classes)


__all__ = ["DenseFFN", "MoEClassifier", "MoEModel", "MoETransformerLM", "build_model"]
