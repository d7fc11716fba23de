"""The chat template lmpipe's exports carry in their tokenizer, and its end-of-turn marker.

ChatML: each message between ``<|im_start|>ROLE`` and ``<|im_end|>``, then an open assistant
turn. Training writes it into every export (``training/export.py``); the server renders chat
requests with whatever template the served tokenizer holds, and stops a turn at the marker.
"""

END_OF_TURN = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
