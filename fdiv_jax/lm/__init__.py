"""The language-model layer: models, tokenizers and what runs them.

``models`` (GPT-2 with a KV cache, LSTM, Hugging Face import), ``tokenization``
(byte-level, toy, ``tokenizer.json``), ``output_layer`` (log-softmax at chosen
tokens without the [B, N, V] logits), ``scoring`` (log-probabilities of given
continuations under any warping), ``sampling`` (the jitted sampler that returns
the exact log q of what it drew), ``enumeration`` (every continuation of a toy
space, for exact metrics) and ``pretrain`` (the demo base model).
"""
