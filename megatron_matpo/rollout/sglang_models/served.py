"""The architectures this project builds and exports (model/builder.py, verifier/export.py), as SGLang
implements them. Read by SGLang's `import_model_classes` (one `EntryClass` per module)."""
from sglang.srt.models.llama import LlamaForCausalLM
from sglang.srt.models.qwen2 import Qwen2ForCausalLM
from sglang.srt.models.qwen2_classification import Qwen2ForSequenceClassification
from sglang.srt.models.qwen3 import Qwen3ForCausalLM
from sglang.srt.models.qwen3_classification import Qwen3ForSequenceClassification

EntryClass = [Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM, Qwen3ForSequenceClassification,
              Qwen2ForSequenceClassification]
