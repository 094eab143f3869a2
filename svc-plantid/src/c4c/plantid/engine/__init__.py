"""The identification engine: CNN weights → ONNX graph → onnxruntime embedder → gallery."""
