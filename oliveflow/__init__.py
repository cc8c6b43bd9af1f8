"""oliveflow: base checkpoint + JSONL examples -> quantized, LoRA-tuned ONNX model for onnxruntime-genai."""

__version__ = "0.1.0"
