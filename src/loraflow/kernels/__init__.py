"""Training kernels under `models.attach_lora`, importing only torch, peft and each other.

dropout: LoRA dropout masks drawn 16 bits an element, one per shared input; fused_lora: PEFT's
LoRA forward with its scalings applied at rank r; head_loss: the LM head and cross-entropy of a
training forward computed together, a chunk of tokens at a time.
"""
