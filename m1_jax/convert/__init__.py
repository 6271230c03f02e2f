"""``m1 convert`` and ``m1 export``: a Hugging Face / PyTorch checkpoint to the model's Orbax layout and back."""
