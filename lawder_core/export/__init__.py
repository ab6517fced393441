"""Hand-offs to the tools the field uses: nnU-Net v2 raw data sets (`nnunet.py`), ONNX Runtime (`onnx.py`)."""
