"""Plain single-device PyTorch model code: no process groups in here."""
