"""Hand-offs to the tools the field uses: ONNX Runtime (`onnx.py`)."""
