"""The file names of a Hugging Face model folder that basin reads or copies, in one place."""

CONFIG_FILES = ("config.json", "generation_config.json")
# token -> id comes from the first of these a folder has (see merging.plan.vocab)
TOKENIZER_MAIN = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                  "sentencepiece.bpe.model")
VOCAB_FILES = (*TOKENIZER_MAIN, "added_tokens.json", "tokenizer_config.json")  # the files that define token -> id
# copied into a merge's output with the tokenizer
TOKENIZER_FILES = (*TOKENIZER_MAIN, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "merges.txt", "chat_template.jinja")
ADAPTER_CONFIG = "adapter_config.json"
# what a Hub download fetches besides the weights (glob patterns covering the names above)
SIDE_PATTERNS = [*CONFIG_FILES, "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                 "merges.txt", "*.model", "chat_template*", ADAPTER_CONFIG, "*.safetensors.index.json"]
