"""Other projects' checkpoint formats: Hugging Face safetensors checkpoints of the
dense families in use today (Llama, Mistral, Qwen2/3, Phi-3, OLMo-2, SmolLM3, MiMo)
in and out, with MTP depths under DeepSeek-V3's or MiMo's names; MaxText's MTP
parameters and loss mask."""

from .._hf_checkpoint import (
    load_hf_checkpoint as load_hf_checkpoint,
    load_llama as load_llama,
    save_hf_checkpoint as save_hf_checkpoint,
    save_llama as save_llama,
)
from .._hf_config import (
    WeightsError as WeightsError,
    model_config_from_hf as model_config_from_hf,
)
from .._hf_config_writing import hf_config as hf_config
from .._hf_names import model_tensors as model_tensors
from .._maxtext import (
    load_maxtext_mtp as load_maxtext_mtp,
    maxtext_loss_mask as maxtext_loss_mask,
)
