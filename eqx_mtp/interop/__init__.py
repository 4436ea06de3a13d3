"""Other projects' checkpoint formats: Hugging Face Llama-family safetensors in and
out, MaxText's MTP parameters and loss mask."""

from .._llama_weights import (
    WeightsError as WeightsError,
    hf_config as hf_config,
    load_llama as load_llama,
    model_config_from_hf as model_config_from_hf,
    model_tensors as model_tensors,
    save_llama as save_llama,
)
from .._maxtext import (
    load_maxtext_mtp as load_maxtext_mtp,
    maxtext_loss_mask as maxtext_loss_mask,
)
