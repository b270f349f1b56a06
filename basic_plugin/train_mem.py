"""``deepspeed --module basic_plugin.train_mem``: as LLaVA's ``train_mem.py`` (FlashAttention-2), with the plugin host."""
from basic_plugin.host.train import main

if __name__ == "__main__":
    main(attn_implementation="flash_attention_2")
