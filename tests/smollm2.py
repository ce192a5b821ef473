"""Token ids of the packaged SmolLM2-135M-Instruct tokenizer that several test modules check
against (<|im_start|> = 1, <|im_end|> = 2), written once."""

from __future__ import annotations

# SmolLM2's default system turn, as the HF tokenizer encodes it.
SYSTEM_TURN = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
SYSTEM_TURN_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198]  # fmt: skip
